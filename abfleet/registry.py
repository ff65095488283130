"""The model registry: MLflow's registered model and its `production` / `candidate` aliases.

Versions are never deleted here: promotion and rollback only move aliases and tag versions.
They act on the versions the caller judged, and refuse (`AliasMoved`) when an alias has
moved since. A model is loaded only as the server expects it: skops, the allow-list from
`abfleet.model`, and the bytes whose sha256 training recorded (`ArtifactRefused` otherwise).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import tempfile
from pathlib import Path

from abfleet.decision import PROMOTE, ROLLBACK
from abfleet.settings import VARIANTS, Settings, set_mlflow_client_defaults


log = logging.getLogger(__name__)

# The version tag holding the sha256 of the version's model.skops, written at training.
CHECKSUM_TAG = "artifact_sha256"
SKOPS_FILE = "model.skops"


class RegistryError(RuntimeError):
    """The registry could not be reached or does not hold what was asked for."""


class AliasMoved(RegistryError):
    """An alias no longer points where the caller saw it: nothing was changed."""


class ArtifactRefused(RegistryError):
    """A version's artifact is not what a server may load. The message is short and safe to
    show publicly ("version 4 refused: artifact checksum mismatch"); `detail` is for the log."""

    def __init__(self, version: str, reason: str, detail: str = ""):
        super().__init__(f"version {version} refused: {reason}")
        self.version, self.reason, self.detail = str(version), reason, detail or reason


@functools.lru_cache(maxsize=8)
def _client(tracking_uri: str):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def client(settings: Settings):
    """An MLflow client for the configured tracking server (also set as mlflow's default)."""
    import mlflow

    set_mlflow_client_defaults()
    mlflow.set_tracking_uri(settings.tracking_uri)
    return _client(settings.tracking_uri)


def version_for(settings: Settings, alias: str) -> str | None:
    """The version an alias points at, or None when the alias (or the model) is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client(settings).get_model_version_by_alias(settings.model_name, alias).version)
    except MlflowException as exc:
        if _is_missing(exc):
            return None
        raise RegistryError(f"registry at {settings.tracking_uri}: {exc.message}") from None


def aliases(settings: Settings) -> dict[str, str | None]:
    """Alias → version for both variants."""
    return {alias: version_for(settings, alias) for alias in VARIANTS}


def moved(expected: dict[str, str | None], actual: dict[str, str | None]) -> list[str]:
    """What moved between `expected` (alias → version as seen) and `actual` (as now), one
    "@alias moved from X to Y" per alias; empty when every alias still points where it did."""
    out = []
    for alias, version in expected.items():
        now = actual.get(alias)
        if (str(version) if version is not None else None) != now:
            out.append(f"@{alias} moved from {_shown(version)} to {_shown(now)}")
    return out


def expect_aliases(settings: Settings, expected: dict[str, str | None], since: str = "it was read") -> None:
    """Raise AliasMoved unless each alias in `expected` points at that version right now."""
    changes = moved(expected, aliases(settings))
    if changes:
        raise AliasMoved(f"{'; '.join(changes)} since {since}")


def experiment_start(settings: Settings, version: str) -> dt.datetime:
    """When `version` became @candidate (its `candidate_since` tag), else when it was registered."""
    info = version_info(settings, version)
    tag = (info.tags or {}).get("candidate_since")
    if tag:
        return dt.datetime.fromisoformat(tag)
    return dt.datetime.fromtimestamp(info.creation_timestamp / 1000, dt.timezone.utc)


def set_alias(settings: Settings, alias: str, version: str) -> None:
    client(settings).set_registered_model_alias(settings.model_name, alias, str(version))
    if alias == "candidate":
        # The experiment window starts here: evaluation counts traffic since this moment.
        tag_version(settings, version, {"candidate_since": _now()})


def delete_alias(settings: Settings, alias: str) -> None:
    client(settings).delete_registered_model_alias(settings.model_name, alias)


def tag_version(settings: Settings, version: str, tags: dict[str, str]) -> None:
    c = client(settings)
    for key, value in tags.items():
        c.set_model_version_tag(settings.model_name, str(version), key, str(value))


def version_info(settings: Settings, version: str):
    return client(settings).get_model_version(settings.model_name, str(version))


def load_model(settings: Settings, version: str):
    """The fitted scikit-learn model of a registered version, loaded as a server expects it:
    the artifact must be skops and its model.skops must hash to the version's
    `artifact_sha256` tag; it is deserialized with `abfleet.model`'s allow-list, never the
    one written in the artifact. Raises ArtifactRefused otherwise."""
    from abfleet import model

    info = version_info(settings, version)
    expected = (info.tags or {}).get(CHECKSUM_TAG)
    with tempfile.TemporaryDirectory(prefix="abfleet-model-") as tmp:
        path = _skops_file(settings, version, Path(tmp))
        if not expected:
            raise ArtifactRefused(version, "no artifact checksum recorded",
                                  f"version {version} has no {CHECKSUM_TAG} tag: retrain it, or check its "
                                  f"{SKOPS_FILE} and set the tag to its sha256")
        actual = file_sha256(path)
        if actual != expected:
            raise ArtifactRefused(version, "artifact checksum mismatch",
                                  f"{SKOPS_FILE} of version {version} hashes to {actual}, its {CHECKSUM_TAG} tag says {expected}")
        try:
            return model.load_skops(path)
        except Exception as exc:  # untrusted types or a damaged file: either way, not ours to run
            raise ArtifactRefused(version, "artifact does not load with the server's allow-list",
                                  f"{type(exc).__name__}: {exc}") from None


def record_checksum(settings: Settings, version: str) -> str:
    """Tag `version` with the sha256 of its model.skops as the artifact store holds it now
    (training calls this right after registering); refuses a version that is not skops."""
    with tempfile.TemporaryDirectory(prefix="abfleet-model-") as tmp:
        digest = file_sha256(_skops_file(settings, version, Path(tmp)))
    tag_version(settings, version, {CHECKSUM_TAG: digest})
    return digest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _skops_file(settings: Settings, version: str, folder: Path) -> Path:
    """Download the version's model artifact into `folder`; the path of its model.skops, once
    its MLmodel says the sklearn flavour is serialized with skops in that very file."""
    import mlflow.artifacts
    import yaml

    client(settings)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{settings.model_name}/{version}", dst_path=str(folder)))
    try:
        flavor = (yaml.safe_load((local / "MLmodel").read_text()) or {}).get("flavors", {}).get("sklearn") or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ArtifactRefused(version, "artifact has no readable MLmodel", str(exc)) from None
    fmt = flavor.get("serialization_format")
    if fmt != "skops" or flavor.get("pickled_model") != SKOPS_FILE:
        # pickle and cloudpickle run code at load: never, whatever else the artifact says.
        raise ArtifactRefused(version, f"serialization {fmt or 'unknown'} is not skops",
                              f"MLmodel of version {version}: sklearn flavour {flavor!r}")
    path = local / SKOPS_FILE
    if not path.is_file():
        raise ArtifactRefused(version, f"artifact has no {SKOPS_FILE}")
    return path


def promote(settings: Settings, reasons: list[str], source: str, *, candidate: str, production: str | None) -> dict:
    """@production → `candidate`; the old production tagged `retired`; @candidate removed,
    only while @candidate is still `candidate` and @production still `production` (the
    versions that were judged); AliasMoved otherwise, with nothing changed.

    Nothing is deleted: the retired version stays registered, one `set_alias` away.
    """
    # MLflow has no compare-and-set on aliases: read, compare, set, read back. A write landing
    # between the compare and the set (milliseconds) is not prevented, only reported; one
    # evaluator runs at a time (evaluate_ab has max_active_runs=1) and the promotion only ever
    # writes the judged version, so the worst case is a brand-new candidate losing its alias.
    expect_aliases(settings, {"candidate": candidate, "production": production}, "it was judged")
    candidate = str(candidate)
    now, why = _now(), _join(reasons)
    set_alias(settings, "production", candidate)
    delete_alias(settings, "candidate")
    tag_version(settings, candidate, {"promoted_at": now, "promoted_by": source, "promoted_reasons": why})
    if production and production != candidate:
        tag_version(settings, production, {"retired": now, "retired_by": source, "retired_for": candidate})
    out = {"action": PROMOTE, "production_version": candidate, "previous_production_version": production}
    return _read_back(settings, out, {"production": candidate, "candidate": None})


def rollback(settings: Settings, reasons: list[str], source: str, *, candidate: str, production: str | None) -> dict:
    """@candidate removed and its version tagged `rolled_back` with the reasons; artifacts
    stay. Only while both aliases still point at the judged versions; AliasMoved otherwise."""
    expect_aliases(settings, {"candidate": candidate, "production": production}, "it was judged")  # promote's window
    candidate = str(candidate)
    delete_alias(settings, "candidate")
    tag_version(settings, candidate, {"rolled_back": _now(), "rolled_back_by": source, "rolled_back_reasons": _join(reasons)})
    out = {"action": ROLLBACK, "rolled_back_version": candidate, "production_version": production}
    return _read_back(settings, out, {"production": production, "candidate": None})


def replace_candidate(settings: Settings, version: str, *, expected: str | None, source: str) -> str | None:
    """@candidate → `version` while it still points at `expected` (AliasMoved otherwise); the
    version it replaces is tagged `superseded` with the time and its successor. Returns it."""
    expect_aliases(settings, {"candidate": expected})
    set_alias(settings, "candidate", version)
    if expected and str(expected) != str(version):
        tag_version(settings, expected, {"superseded": _now(), "superseded_by": str(version), "superseded_source": source})
    return expected


def _read_back(settings: Settings, out: dict, intended: dict[str, str | None]) -> dict:
    # Another writer in the compare-to-set window shows up here: said, not undone.
    conflict = moved(intended, aliases(settings))
    if conflict:
        out["conflict"] = "; ".join(conflict) + " while the action was being applied"
        log.warning("%s: %s", out["action"], out["conflict"])
    return out


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _join(reasons: list[str]) -> str:
    # MLflow caps tag values; the decisions table keeps the full text.
    return "; ".join(reasons)[:4900]


def _shown(version: str | None) -> str:
    return str(version) if version is not None else "none"


def _is_missing(exc) -> bool:
    code = getattr(exc, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") or "not found" in str(exc).lower()
