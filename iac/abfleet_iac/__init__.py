"""abfleet on AWS: one ComponentResource per concern, wired by iac/__main__.py.

Each component takes an `Args` dataclass (with the common `tags`) and creates its children
with `parent=self`, so they inherit the provider (and its default tags) from the component.
"""

from abfleet_iac.artifacts import Artifacts, ArtifactsArgs
from abfleet_iac.compute import Compute, ComputeArgs
from abfleet_iac.database import Database, DatabaseArgs
from abfleet_iac.iam import Iam, IamArgs
from abfleet_iac.images import Images, ImagesArgs
from abfleet_iac.network import Network, NetworkArgs

__all__ = [
    "Artifacts", "ArtifactsArgs", "Compute", "ComputeArgs", "Database", "DatabaseArgs",
    "Iam", "IamArgs", "Images", "ImagesArgs", "Network", "NetworkArgs",
]
