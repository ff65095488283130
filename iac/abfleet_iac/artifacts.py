"""The artifact bucket: models, datasets and MLflow artifacts.

Versioned (a rolled-back model's files stay recoverable; nothing is deleted by the fleet),
encrypted with a customer-managed KMS key (bucket key on), never public, reachable only
over TLS, and old non-current versions expire after `noncurrent_version_days`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pulumi
import pulumi_aws as aws

from abfleet_iac._util import policy_output, tags_for


@dataclass
class ArtifactsArgs:
    name: str
    tags: dict[str, str]
    noncurrent_version_days: int = 90
    # "aws:kms" (a key made here) or "AES256" (S3-managed keys).
    sse_algorithm: str = "aws:kms"
    force_destroy: bool = False


class Artifacts(pulumi.ComponentResource):
    def __init__(self, resource_name: str, args: ArtifactsArgs, opts: Optional[pulumi.ResourceOptions] = None):
        super().__init__("abfleet:aws:Artifacts", resource_name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        n, tags = args.name, args.tags
        if args.sse_algorithm not in ("aws:kms", "AES256"):
            raise ValueError(f"sse_algorithm must be aws:kms or AES256, got {args.sse_algorithm!r}")

        # Without an explicit key policy AWS applies its default one (the account's
        # administrators manage the key; IAM policies grant its use, as iam.py does).
        self.kms_key: Optional[aws.kms.Key] = None
        if args.sse_algorithm == "aws:kms":
            self.kms_key = aws.kms.Key(
                f"{n}-artifacts-key", description=f"{n}: artifact bucket encryption",
                enable_key_rotation=True, deletion_window_in_days=30,
                tags=tags_for(tags, f"{n}-artifacts"), opts=child)
            aws.kms.Alias(f"{n}-artifacts-key", name=f"alias/{n}-artifacts", target_key_id=self.kms_key.key_id, opts=child)

        self.bucket = aws.s3.Bucket(
            f"{n}-artifacts", force_destroy=args.force_destroy,
            tags=tags_for(tags, f"{n}-artifacts", data="models-and-datasets"), opts=child)

        self.ownership = aws.s3.BucketOwnershipControls(
            f"{n}-artifacts", bucket=self.bucket.id,
            rule={"object_ownership": "BucketOwnerEnforced"}, opts=child)

        self.public_access_block = aws.s3.BucketPublicAccessBlock(
            f"{n}-artifacts", bucket=self.bucket.id,
            block_public_acls=True, block_public_policy=True, ignore_public_acls=True, restrict_public_buckets=True,
            opts=child)

        self.versioning = aws.s3.BucketVersioning(
            f"{n}-artifacts", bucket=self.bucket.id,
            versioning_configuration={"status": "Enabled"}, opts=child)

        self.encryption = aws.s3.BucketServerSideEncryptionConfiguration(
            f"{n}-artifacts", bucket=self.bucket.id,
            rules=[{
                "apply_server_side_encryption_by_default": {
                    "sse_algorithm": args.sse_algorithm,
                    "kms_master_key_id": self.kms_key.arn if self.kms_key else None,
                },
                "bucket_key_enabled": args.sse_algorithm == "aws:kms",
            }],
            opts=child)

        self.lifecycle = aws.s3.BucketLifecycleConfiguration(
            f"{n}-artifacts", bucket=self.bucket.id,
            rules=[
                {
                    "id": "expire-noncurrent-versions",
                    "status": "Enabled",
                    "filter": {},
                    "noncurrent_version_expiration": {"noncurrent_days": args.noncurrent_version_days},
                },
                {
                    "id": "abort-incomplete-multipart-uploads",
                    "status": "Enabled",
                    "filter": {},
                    "abort_incomplete_multipart_upload": {"days_after_initiation": 7},
                },
            ],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.versioning]))

        # TLS only. A Deny for every principal and every S3 action is the documented form
        # of this guard; the wildcards are in a Deny, so they grant nothing.
        self.policy = aws.s3.BucketPolicy(
            f"{n}-artifacts", bucket=self.bucket.id,
            policy=policy_output({
                "Sid": "DenyInsecureTransport",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": [self.bucket.arn, pulumi.Output.concat(self.bucket.arn, "/*")],
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            }),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.public_access_block]))

        self.bucket_name = self.bucket.bucket
        self.bucket_arn = self.bucket.arn
        self.kms_key_arn = self.kms_key.arn if self.kms_key else None
        self.register_outputs({"bucket_name": self.bucket_name, "bucket_arn": self.bucket_arn})
