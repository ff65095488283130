"""abfleet on AWS. This file only reads the stack's configuration and wires the components
(iac/abfleet_iac/); every resource lives in a component. See docs/running-at-scale.md.

Required:  aws:region, abfleet:dbPassword (secret), abfleet:imageTag (the git sha the
           deploy workflow pushed).
"""

import pulumi
import pulumi_aws as aws

from abfleet_iac import (Artifacts, ArtifactsArgs, Compute, ComputeArgs, Database, DatabaseArgs, Iam, IamArgs,
                         Images, ImagesArgs, Network, NetworkArgs)
from abfleet_iac.compute import ServiceSize

config = pulumi.Config()  # the "abfleet" namespace (the project's name)
region = pulumi.Config("aws").require("region")
stack = pulumi.get_stack()
environment = config.get("environment") or stack
name = config.get("namePrefix") or f"abfleet-{environment}"

tags = {
    "project": "abfleet",
    "environment": environment,
    "managed-by": "pulumi",
    "pulumi-stack": stack,
    **(config.get_object("tags") or {}),
}

# Default tags on the provider tag everything it creates; the components also pass the
# same tags explicitly on every resource that takes them (the tests check those).
provider = aws.Provider("aws", region=region, default_tags={"tags": tags})
opts = pulumi.ResourceOptions(providers=[provider])

model_prefix = config.get("modelPrefix") or "mlflow"
# The router's split, in percent: the one value the router, the servers and the pipeline
# (which reads the `candidate_weight` output into ABFLEET_CANDIDATE_WEIGHT) share.
candidate_weight = config.get_int("candidateWeight")
candidate_weight = 20 if candidate_weight is None else candidate_weight
if not 0 <= candidate_weight <= 100:
    raise ValueError(f"abfleet:candidateWeight must be 0..100, got {candidate_weight}")

network = Network("network", NetworkArgs(
    name=name, region=region, tags=tags,
    cidr_block=config.get("vpcCidr") or "10.40.0.0/16",
    availability_zones=config.get_object("availabilityZones"),
    nat_gateway=config.get_bool("natGateway") is not False,
), opts=opts)

artifacts = Artifacts("artifacts", ArtifactsArgs(
    name=name, tags=tags,
    noncurrent_version_days=config.get_int("noncurrentVersionDays") or 90,
    sse_algorithm=config.get("sseAlgorithm") or "aws:kms",
), opts=opts)

images = Images("images", ImagesArgs(name=name, tags=tags), opts=opts)

database = Database("database", DatabaseArgs(
    name=name, tags=tags,
    subnet_ids=network.private_subnet_ids, security_group_id=network.db_sg.id,
    password=config.require_secret("dbPassword"),
    instance_class=config.get("dbInstanceClass") or "db.t4g.micro",
    allocated_storage=config.get_int("dbAllocatedStorage") or 20,
    multi_az=bool(config.get_bool("dbMultiAz")),
    deletion_protection=config.get_bool("dbDeletionProtection") is not False,
), opts=opts)

iam = Iam("iam", IamArgs(
    name=name, tags=tags,
    bucket_arn=artifacts.bucket_arn, model_prefix=model_prefix, kms_key_arn=artifacts.kms_key_arn,
    repository_arns=list(images.repository_arns.values()),
    secret_arns=database.secret_arns,
), opts=opts)

compute = Compute("compute", ComputeArgs(
    name=name, region=region, tags=tags,
    vpc_id=network.vpc_id,
    public_subnet_ids=network.public_subnet_ids, private_subnet_ids=network.private_subnet_ids,
    trusted_proxy_cidrs=network.public_subnet_cidrs,
    alb_security_group_id=network.alb_sg.id, router_security_group_id=network.router_sg.id,
    model_security_group_id=network.model_sg.id, mlflow_security_group_id=network.mlflow_sg.id,
    repository_urls=images.repository_urls, image_tag=config.require("imageTag"),
    execution_role_arn=iam.execution_role.arn, execution_role_name=iam.execution_role.name,
    serving_role_arn=iam.serving_role.arn, mlflow_role_arn=iam.mlflow_role.arn,
    database_url_secret_arn=database.app_url_secret.arn,
    mlflow_backend_secret_arn=database.mlflow_url_secret.arn,
    bucket_name=artifacts.bucket_name, model_prefix=model_prefix,
    candidate_weight=candidate_weight,
    certificate_arn=config.get("certificateArn"),
    production=ServiceSize(desired_count=config.get_int("productionCount") or 2, min_count=config.get_int("productionMin") or 2,
                           max_count=config.get_int("productionMax") or 6),
    candidate=ServiceSize(desired_count=config.get_int("candidateCount") or 1, min_count=config.get_int("candidateMin") or 1,
                          max_count=config.get_int("candidateMax") or 3),
), opts=opts)

pulumi.export("url", compute.url)
pulumi.export("bucket", artifacts.bucket_name)
pulumi.export("repositories", images.repository_urls)
pulumi.export("cluster", compute.cluster.name)
pulumi.export("training_role_arn", iam.training_role.arn)
pulumi.export("database_address", database.instance.address)
pulumi.export("candidate_weight", candidate_weight)
