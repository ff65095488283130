"""PostgreSQL on RDS: private subnets only, not publicly accessible, storage encrypted,
deletion-protected by default, backups kept. The connection URLs the tasks need are
stored in Secrets Manager and injected by ECS as secrets (never plain environment).

One instance, two databases: `abfleet` (predictions, feedback, decisions; created by RDS
as the initial database) and `mlflow` (the registry; created if missing by a one-shot
container in MLflow's task, see compute.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence
from urllib.parse import quote

import pulumi
import pulumi_aws as aws

from abfleet_iac._util import tags_for


@dataclass
class DatabaseArgs:
    name: str
    tags: dict[str, str]
    subnet_ids: Sequence[pulumi.Input[str]]
    security_group_id: pulumi.Input[str]
    password: pulumi.Input[str]
    username: str = "abfleet"
    app_database: str = "abfleet"
    mlflow_database: str = "mlflow"
    instance_class: str = "db.t4g.micro"
    allocated_storage: int = 20
    max_allocated_storage: int = 100
    engine_version: str = "16"
    multi_az: bool = False
    backup_retention_days: int = 7
    deletion_protection: bool = True


class Database(pulumi.ComponentResource):
    def __init__(self, resource_name: str, args: DatabaseArgs, opts: Optional[pulumi.ResourceOptions] = None):
        super().__init__("abfleet:aws:Database", resource_name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        n, tags = args.name, args.tags

        self.subnet_group = aws.rds.SubnetGroup(
            f"{n}-db", subnet_ids=list(args.subnet_ids), description=f"{n}: private subnets",
            tags=tags_for(tags, f"{n}-db"), opts=child)

        self.instance = aws.rds.Instance(
            f"{n}-db",
            identifier=f"{n}-db",
            engine="postgres", engine_version=args.engine_version, instance_class=args.instance_class,
            allocated_storage=args.allocated_storage, max_allocated_storage=args.max_allocated_storage,
            storage_type="gp3", storage_encrypted=True,
            db_name=args.app_database, username=args.username, password=args.password,
            db_subnet_group_name=self.subnet_group.name, vpc_security_group_ids=[args.security_group_id],
            publicly_accessible=False, multi_az=args.multi_az,
            backup_retention_period=args.backup_retention_days, copy_tags_to_snapshot=True,
            deletion_protection=args.deletion_protection,
            skip_final_snapshot=False, final_snapshot_identifier=f"{n}-db-final",
            auto_minor_version_upgrade=True, apply_immediately=False,
            tags=tags_for(tags, f"{n}-db"), opts=child)

        def url(database: str) -> pulumi.Output[str]:
            return pulumi.Output.secret(pulumi.Output.all(self.instance.address, self.instance.port, args.password).apply(
                lambda v: f"postgresql://{quote(args.username, safe='')}:{quote(str(v[2]), safe='')}@{v[0]}:{v[1]}/{database}"))

        def secret(kind: str, database: str) -> aws.secretsmanager.Secret:
            s = aws.secretsmanager.Secret(
                f"{n}-{kind}", name_prefix=f"{n}/{kind}-", description=f"{n}: connection URL of the {database} database",
                recovery_window_in_days=7, tags=tags_for(tags, f"{n}-{kind}"), opts=child)
            aws.secretsmanager.SecretVersion(f"{n}-{kind}", secret_id=s.id, secret_string=url(database), opts=child)
            return s

        self.app_url_secret = secret("database-url", args.app_database)
        self.mlflow_url_secret = secret("mlflow-backend-store-uri", args.mlflow_database)
        self.secret_arns = [self.app_url_secret.arn, self.mlflow_url_secret.arn]
        self.register_outputs({"address": self.instance.address})
