"""ECR repositories, one per image the deploy workflow builds: inference, router, mlflow,
airflow. Tags are immutable (the workflow pushes the git sha), images are scanned on push,
untagged images expire."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Sequence

import pulumi
import pulumi_aws as aws

from abfleet_iac._util import tags_for

IMAGES = ("inference", "router", "mlflow", "airflow")


@dataclass
class ImagesArgs:
    name: str
    tags: dict[str, str]
    images: Sequence[str] = IMAGES
    untagged_days: int = 14
    force_delete: bool = False


class Images(pulumi.ComponentResource):
    def __init__(self, resource_name: str, args: ImagesArgs, opts: Optional[pulumi.ResourceOptions] = None):
        super().__init__("abfleet:aws:Images", resource_name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.repositories: dict[str, aws.ecr.Repository] = {}
        for image in args.images:
            repo = aws.ecr.Repository(
                f"{args.name}-{image}", name=f"{args.name}/{image}",
                image_tag_mutability="IMMUTABLE",
                image_scanning_configuration={"scan_on_push": True},
                encryption_configurations=[{"encryption_type": "AES256"}],
                force_delete=args.force_delete,
                tags=tags_for(args.tags, f"{args.name}/{image}", image=image), opts=child)
            aws.ecr.LifecyclePolicy(
                f"{args.name}-{image}", repository=repo.name,
                policy=json.dumps({"rules": [{
                    "rulePriority": 1,
                    "description": f"expire untagged images after {args.untagged_days} days",
                    "selection": {"tagStatus": "untagged", "countType": "sinceImagePushed",
                                  "countUnit": "days", "countNumber": args.untagged_days},
                    "action": {"type": "expire"},
                }]}),
                opts=child)
            self.repositories[image] = repo
        self.repository_urls = {k: r.repository_url for k, r in self.repositories.items()}
        self.repository_arns = {k: r.arn for k, r in self.repositories.items()}
        self.register_outputs({"repository_urls": self.repository_urls})
