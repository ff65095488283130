"""IAM roles for the ECS tasks, least privilege.

  execution  pulls our images, reads our secrets (the compute component adds its log groups)
  serving    model servers: s3:GetObject + s3:ListBucket on the model prefix, nothing else
  mlflow     the tracking server: get/put on the model prefix (it writes the artifacts)
  training   training jobs: get/put anywhere in the bucket (datasets, reports)

No Allow statement has a bare "*" action or resource, with one exception that AWS
imposes: ecr:GetAuthorizationToken supports no resource-level permission, so the
execution role's statement for it names Resource "*" (the token alone grants no pull;
pulls are limited to our repositories by the statement after it).
Nothing may delete objects: rollbacks move registry aliases, versions stay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import pulumi
import pulumi_aws as aws

from abfleet_iac._util import assume_role_policy, policy_output, tags_for

ECS_TASKS = "ecs-tasks.amazonaws.com"


@dataclass
class IamArgs:
    name: str
    tags: dict[str, str]
    bucket_arn: pulumi.Input[str]
    # The folder of the bucket the model servers may read (MLflow's artifacts).
    model_prefix: str = "mlflow"
    kms_key_arn: Optional[pulumi.Input[str]] = None
    repository_arns: Sequence[pulumi.Input[str]] = field(default_factory=list)
    secret_arns: Sequence[pulumi.Input[str]] = field(default_factory=list)


class Iam(pulumi.ComponentResource):
    def __init__(self, resource_name: str, args: IamArgs, opts: Optional[pulumi.ResourceOptions] = None):
        super().__init__("abfleet:aws:Iam", resource_name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        n, tags = args.name, args.tags
        prefix = args.model_prefix.strip("/")
        bucket = args.bucket_arn
        prefix_objects = pulumi.Output.concat(bucket, f"/{prefix}/*")
        all_objects = pulumi.Output.concat(bucket, "/*")

        def role(kind: str, description: str) -> aws.iam.Role:
            return aws.iam.Role(
                f"{n}-{kind}", name=f"{n}-{kind}", description=description,
                assume_role_policy=assume_role_policy(ECS_TASKS), max_session_duration=3600,
                tags=tags_for(tags, f"{n}-{kind}", role=kind), opts=child)

        def kms(*actions: str) -> list[dict]:
            if args.kms_key_arn is None:
                return []
            return [{"Sid": "UseArtifactKey", "Effect": "Allow", "Action": list(actions), "Resource": args.kms_key_arn}]

        # ---- execution role: what ECS itself needs to start a task ---------------------------
        self.execution_role = role("task-execution", "ECS: pull abfleet images, read abfleet secrets, write logs")
        execution_statements: list[dict] = [
            {"Sid": "EcrAuthTokenHasNoResourceLevelPermissions", "Effect": "Allow",
             "Action": "ecr:GetAuthorizationToken", "Resource": "*"},
        ]
        if args.repository_arns:
            execution_statements.append({
                "Sid": "PullAbfleetImages", "Effect": "Allow",
                "Action": ["ecr:BatchCheckLayerAvailability", "ecr:GetDownloadUrlForLayer", "ecr:BatchGetImage"],
                "Resource": list(args.repository_arns)})
        if args.secret_arns:
            execution_statements.append({
                "Sid": "ReadAbfleetSecrets", "Effect": "Allow",
                "Action": "secretsmanager:GetSecretValue", "Resource": list(args.secret_arns)})
        aws.iam.RolePolicy(f"{n}-task-execution", role=self.execution_role.id,
                           policy=policy_output(*execution_statements), opts=child)

        # ---- serving: read-only on the model prefix ------------------------------------------
        self.serving_role = role("serving-task", "abfleet model servers: read models only")
        self.serving_policy = aws.iam.RolePolicy(
            f"{n}-serving-task", role=self.serving_role.id,
            policy=policy_output(
                {"Sid": "ReadModels", "Effect": "Allow", "Action": "s3:GetObject", "Resource": prefix_objects},
                {"Sid": "ListModelPrefix", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": bucket,
                 "Condition": {"StringLike": {"s3:prefix": [prefix, f"{prefix}/*"]}}},
                *kms("kms:Decrypt"),
            ),
            opts=child)

        # ---- MLflow: writes the artifacts under the model prefix -----------------------------
        self.mlflow_role = role("mlflow-task", "abfleet MLflow server: read and write artifacts")
        aws.iam.RolePolicy(
            f"{n}-mlflow-task", role=self.mlflow_role.id,
            policy=policy_output(
                {"Sid": "ReadWriteArtifacts", "Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"],
                 "Resource": prefix_objects},
                {"Sid": "ListModelPrefix", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": bucket,
                 "Condition": {"StringLike": {"s3:prefix": [prefix, f"{prefix}/*"]}}},
                *kms("kms:Decrypt", "kms:GenerateDataKey"),
            ),
            opts=child)

        # ---- training: datasets, reports and models anywhere in the bucket --------------------
        self.training_role = role("training-task", "abfleet training and evaluation jobs")
        aws.iam.RolePolicy(
            f"{n}-training-task", role=self.training_role.id,
            policy=policy_output(
                {"Sid": "ReadWriteBucket", "Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"],
                 "Resource": all_objects},
                {"Sid": "ListBucket", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": bucket},
                *kms("kms:Decrypt", "kms:GenerateDataKey"),
            ),
            opts=child)

        self.register_outputs({
            "execution_role_arn": self.execution_role.arn,
            "serving_role_arn": self.serving_role.arn,
            "mlflow_role_arn": self.mlflow_role.arn,
            "training_role_arn": self.training_role.arn,
        })
