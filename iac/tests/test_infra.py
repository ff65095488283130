"""The Pulumi program under mocks: no Pulumi CLI, no AWS account, no network.

    .venv/bin/python -m pytest iac/tests -q -p no:cacheprovider

`Mocks.new_resource` records every resource's inputs as the engine would receive them
(camelCase keys). The whole program (iac/__main__.py) runs once under a test config; the
checks then read the recorded inputs. A few checks also go through a component's own
Outputs with `Output.all(...).apply(...)`.
"""

from __future__ import annotations

import inspect
import json
import runpy
import sys
from pathlib import Path

import pulumi
import pulumi_aws
import pytest

IAC = Path(__file__).resolve().parents[1]
if str(IAC) not in sys.path:
    sys.path.insert(0, str(IAC))

ACCOUNT = "123456789012"
REGION = "ap-south-1"
MODEL_PORT = 8000
WORLD = {"0.0.0.0/0", "::/0"}


class Mocks(pulumi.runtime.Mocks):
    """Answers like AWS would, closely enough for the program to wire itself."""

    def __init__(self) -> None:
        self.resources: list[pulumi.runtime.MockResourceArgs] = []
        self.calls: list[str] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        self.resources.append(args)
        inputs = dict(args.inputs)
        name = inputs.get("name") or args.name
        service = args.typ.split(":")[1].split("/")[0] if args.typ.startswith("aws:") else "mock"
        state = {**inputs, "name": name, "arn": f"arn:aws:{service}:{REGION}:{ACCOUNT}:{args.typ.rsplit(':', 1)[-1].lower()}/{name}"}
        if args.typ == "aws:s3/bucket:Bucket":
            state.update(bucket=args.name, arn=f"arn:aws:s3:::{args.name}")
        elif args.typ == "aws:ecr/repository:Repository":
            state["repositoryUrl"] = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/{name}"
        elif args.typ == "aws:rds/instance:Instance":
            state.update(address=f"{args.name}.abc.{REGION}.rds.amazonaws.com", port=5432)
        elif args.typ == "aws:lb/loadBalancer:LoadBalancer":
            state["dnsName"] = f"{args.name}.{REGION}.elb.amazonaws.com"
        elif args.typ == "aws:kms/key:Key":
            state["keyId"] = f"{args.name}-key-id"
        elif args.typ == "aws:cloudwatch/logGroup:LogGroup":
            state["arn"] = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{name}"
        return f"{args.name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs):
        self.calls.append(args.token)
        if args.token == "aws:index/getAvailabilityZones:getAvailabilityZones":
            return {"names": [f"{REGION}a", f"{REGION}b", f"{REGION}c"],
                    "zoneIds": ["aps1-az1", "aps1-az3", "aps1-az2"], "id": REGION}
        return {}


MOCKS = Mocks()
pulumi.runtime.set_mocks(MOCKS, project="abfleet", stack="test", preview=False)

# Imported after set_mocks, as Pulumi's testing guide asks.
from abfleet_iac import Artifacts, ArtifactsArgs, Iam, IamArgs, Network, NetworkArgs  # noqa: E402

TEST_CONFIG = {
    "aws:region": REGION,
    "abfleet:dbPassword": "not-a-real-password",
    "abfleet:imageTag": "0123456789abcdef0123456789abcdef01234567",
    "abfleet:tags": json.dumps({"owner": "platform-team"}),
}
COMMON_TAGS = {"project": "abfleet", "environment": "test", "managed-by": "pulumi"}


# ---- helpers ------------------------------------------------------------------------------

def of_type(resources, typ: str) -> list:
    return [r for r in resources if r.typ == typ]


def statements(policy) -> list[dict]:
    doc = json.loads(policy) if isinstance(policy, str) else policy
    found = doc["Statement"]
    return found if isinstance(found, list) else [found]


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def field(obj, key: str):
    """A value from an Output's resolved object: a dict or a Pulumi output type."""
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key)


def resource_class(typ: str):
    """'aws:ec2/vpc:Vpc' -> pulumi_aws.ec2.Vpc"""
    _, module_path, cls = typ.split(":")
    module = module_path.split("/")[0]
    return getattr(pulumi_aws if module == "index" else getattr(pulumi_aws, module), cls)


def accepts_tags(typ: str) -> bool:
    return "tags" in inspect.signature(resource_class(typ)._internal_init).parameters


def port_covered(rule: dict, port: int) -> bool:
    proto = str(rule.get("ipProtocol", rule.get("protocol", "tcp")))
    if proto in ("-1", "all"):
        return True
    low, high = rule.get("fromPort"), rule.get("toPort")
    return low is not None and high is not None and int(low) <= port <= int(high)


# ---- the whole program, once ----------------------------------------------------------------

@pytest.fixture(scope="module")
def program() -> list:
    pulumi.runtime.set_all_config(TEST_CONFIG, secret_keys=["abfleet:dbPassword"])
    start = len(MOCKS.resources)

    @pulumi.runtime.test
    def run():
        runpy.run_path(str(IAC / "__main__.py"), run_name="__main__")

    run()
    resources = MOCKS.resources[start:]
    assert resources, "the program registered no resource"
    return resources


def test_program_creates_every_part(program):
    types = {r.typ for r in program}
    for expected in ("aws:ec2/vpc:Vpc", "aws:s3/bucket:Bucket", "aws:ecr/repository:Repository",
                     "aws:ecs/cluster:Cluster", "aws:ecs/service:Service", "aws:ecs/taskDefinition:TaskDefinition",
                     "aws:rds/instance:Instance", "aws:iam/role:Role", "aws:lb/loadBalancer:LoadBalancer",
                     "aws:appautoscaling/target:Target", "aws:appautoscaling/policy:Policy"):
        assert expected in types, f"no {expected} in the program"
    components = {r.typ for r in program if not r.custom}
    assert {"abfleet:aws:Network", "abfleet:aws:Artifacts", "abfleet:aws:Images", "abfleet:aws:Compute",
            "abfleet:aws:Database", "abfleet:aws:Iam"} <= components


# ---- artifacts --------------------------------------------------------------------------------

def test_bucket_is_versioned_and_encrypted(program):
    [versioning] = of_type(program, "aws:s3/bucketVersioning:BucketVersioning")
    assert versioning.inputs["versioningConfiguration"]["status"] == "Enabled"
    [sse] = of_type(program, "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration")
    [rule] = sse.inputs["rules"]
    default = rule["applyServerSideEncryptionByDefault"]
    assert default["sseAlgorithm"] in ("aws:kms", "AES256")
    if default["sseAlgorithm"] == "aws:kms":
        assert default.get("kmsMasterKeyId"), "aws:kms without a key"


def test_bucket_blocks_every_kind_of_public_access(program):
    blocks = of_type(program, "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock")
    assert len(blocks) == len(of_type(program, "aws:s3/bucket:Bucket")) >= 1
    for block in blocks:
        for key in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets"):
            assert block.inputs.get(key) is True, f"{key} is not true"


def test_bucket_policy_denies_requests_without_tls(program):
    [policy] = of_type(program, "aws:s3/bucketPolicy:BucketPolicy")
    denies = [s for s in statements(policy.inputs["policy"]) if s["Effect"] == "Deny"]
    assert any(s.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false" for s in denies)


def test_lifecycle_expires_noncurrent_versions(program):
    [lifecycle] = of_type(program, "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration")
    days = [r["noncurrentVersionExpiration"]["noncurrentDays"] for r in lifecycle.inputs["rules"]
            if r.get("status") == "Enabled" and r.get("noncurrentVersionExpiration")]
    assert days and all(d > 0 for d in days)


@pulumi.runtime.test
def test_artifacts_component_outputs():
    """The same guarantees, read through the component's Outputs."""
    a = Artifacts("unit-artifacts", ArtifactsArgs(name="unit", tags=COMMON_TAGS, noncurrent_version_days=30))

    def check(values):
        versioning, rules, acls, policy, ignore, restrict, lifecycle = values
        assert field(versioning, "status") == "Enabled"
        default = field(rules[0], "apply_server_side_encryption_by_default")
        assert field(default, "sse_algorithm") == "aws:kms"
        assert acls is policy is ignore is restrict is True
        expiring = [field(field(r, "noncurrent_version_expiration"), "noncurrent_days") for r in lifecycle
                    if field(r, "noncurrent_version_expiration")]
        assert expiring == [30]

    return pulumi.Output.all(
        a.versioning.versioning_configuration, a.encryption.rules,
        a.public_access_block.block_public_acls, a.public_access_block.block_public_policy,
        a.public_access_block.ignore_public_acls, a.public_access_block.restrict_public_buckets,
        a.lifecycle.rules,
    ).apply(check)


# ---- network ------------------------------------------------------------------------------------

def test_no_ingress_opens_a_model_server_port_to_the_world(program):
    offending = []
    for r in of_type(program, "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"):
        if {r.inputs.get("cidrIpv4"), r.inputs.get("cidrIpv6")} & WORLD and port_covered(r.inputs, MODEL_PORT):
            offending.append(r.name)
    for r in of_type(program, "aws:ec2/securityGroupRule:SecurityGroupRule"):
        if r.inputs.get("type") == "ingress" and WORLD & set(r.inputs.get("cidrBlocks") or []) and port_covered(r.inputs, MODEL_PORT):
            offending.append(r.name)
    for sg in of_type(program, "aws:ec2/securityGroup:SecurityGroup"):
        for rule in sg.inputs.get("ingress") or []:
            cidrs = set(rule.get("cidrBlocks") or []) | set(rule.get("ipv6CidrBlocks") or [])
            if cidrs & WORLD and port_covered(rule, MODEL_PORT):
                offending.append(sg.name)
    assert not offending, f"port {MODEL_PORT} open to the internet: {offending}"


def test_model_servers_are_reached_only_from_the_router(program):
    groups = {r.name: r for r in of_type(program, "aws:ec2/securityGroup:SecurityGroup")}
    model_sg = next(f"{name}-id" for name in groups if name.endswith("-model"))
    router_sg = next(f"{name}-id" for name in groups if name.endswith("-router"))
    rules = [r.inputs for r in of_type(program, "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")
             if r.inputs.get("securityGroupId") == model_sg]
    assert rules, "the model servers' group has no ingress rule at all"
    for rule in rules:
        assert rule.get("referencedSecurityGroupId") == router_sg and not rule.get("cidrIpv4"), rule


def test_only_the_alb_is_public(program):
    lbs = of_type(program, "aws:lb/loadBalancer:LoadBalancer")
    assert [lb.inputs.get("internal") for lb in lbs] == [False]
    for svc in of_type(program, "aws:ecs/service:Service"):
        assert svc.inputs["networkConfiguration"].get("assignPublicIp") in (False, None), svc.name
    subnets = {r.name: r.inputs for r in of_type(program, "aws:ec2/subnet:Subnet")}
    private_ids = {f"{name}-id" for name in subnets if "-private-" in name}
    assert len(private_ids) == 2 and len(subnets) == 4
    for svc in of_type(program, "aws:ecs/service:Service"):
        assert set(svc.inputs["networkConfiguration"]["subnets"]) <= private_ids, f"{svc.name} outside the private subnets"


@pulumi.runtime.test
def test_network_component_opens_the_alb_only_on_80_and_443():
    net = Network("unit-net", NetworkArgs(name="unit-net", region=REGION, tags=COMMON_TAGS,
                                          availability_zones=["x-1a", "x-1b"], nat_gateway=False))
    assert len(net.public_subnets) == 2 and len(net.private_subnets) == 2
    rules = list(net.ingress_rules.values())

    def check(values):
        world_ports = sorted(port for cidr, port in zip(values[::2], values[1::2]) if cidr in WORLD)
        assert world_ports == [80, 443], world_ports

    return pulumi.Output.all(*[o for r in rules for o in (r.cidr_ipv4, r.from_port)]).apply(check)


# ---- IAM ----------------------------------------------------------------------------------------

def _role_policies(program, role_fragment: str) -> list[dict]:
    roles = [r for r in of_type(program, "aws:iam/role:Role") if role_fragment in r.name]
    assert len(roles) == 1, f"expected one role named like {role_fragment!r}, got {[r.name for r in roles]}"
    role_id = f"{roles[0].name}-id"
    inline = [statements(r.inputs["policy"]) for r in of_type(program, "aws:iam/rolePolicy:RolePolicy")
              if r.inputs.get("role") == role_id]
    attached = [r.inputs.get("policyArn") for r in of_type(program, "aws:iam/rolePolicyAttachment:RolePolicyAttachment")
                if r.inputs.get("role") == role_id]
    assert not attached, f"managed policies attached to the {role_fragment} role: {attached}"
    return [s for doc in inline for s in doc]


def test_serving_role_can_only_read_models(program):
    found = _role_policies(program, "serving-task")
    assert found, "the serving role has no policy"
    actions = {a for s in found for a in as_list(s["Action"])}
    forbidden = {"*", "s3:*", "s3:PutObject", "s3:DeleteObject", "s3:DeleteObjectVersion", "s3:PutBucketPolicy"}
    assert not actions & forbidden, actions & forbidden
    assert actions <= {"s3:GetObject", "s3:ListBucket", "kms:Decrypt"}, actions
    for s in found:
        assert s["Effect"] == "Allow"
        assert "*" not in as_list(s["Resource"])
        if "s3:GetObject" in as_list(s["Action"]):
            assert all(res.endswith("/mlflow/*") for res in as_list(s["Resource"])), s["Resource"]


@pulumi.runtime.test
def test_iam_component_serving_policy_through_outputs():
    iam = Iam("unit-iam", IamArgs(name="unit-iam", tags=COMMON_TAGS, bucket_arn="arn:aws:s3:::unit-bucket",
                                  model_prefix="models"))

    def check(values):
        policy, role, role_id = values
        assert role == role_id
        found = statements(policy)
        assert {a for s in found for a in as_list(s["Action"])} == {"s3:GetObject", "s3:ListBucket"}
        assert {r for s in found for r in as_list(s["Resource"])} == {"arn:aws:s3:::unit-bucket/models/*",
                                                                         "arn:aws:s3:::unit-bucket"}

    return pulumi.Output.all(iam.serving_policy.policy, iam.serving_policy.role, iam.serving_role.id).apply(check)


def test_training_role_reads_and_writes_but_never_deletes(program):
    actions = {a for s in _role_policies(program, "training-task") for a in as_list(s["Action"])}
    assert {"s3:GetObject", "s3:PutObject"} <= actions
    assert not {a for a in actions if "Delete" in a or a.endswith(":*") or a == "*"}


def test_no_allow_statement_uses_a_bare_wildcard(program):
    """`*` only where AWS demands it: ecr:GetAuthorizationToken has no resource-level permissions."""
    docs = [r.inputs["policy"] for r in program if r.typ in ("aws:iam/rolePolicy:RolePolicy", "aws:s3/bucketPolicy:BucketPolicy",
                                                            "aws:iam/policy:Policy")]
    docs += [r.inputs["assumeRolePolicy"] for r in of_type(program, "aws:iam/role:Role")]
    assert docs
    for doc in docs:
        for s in statements(doc):
            if s["Effect"] != "Allow":
                continue  # a Deny with wildcards grants nothing (the TLS-only bucket policy)
            actions = as_list(s["Action"])
            assert not [a for a in actions if a == "*" or a.endswith(":*")], s
            if "*" in as_list(s.get("Resource", [])):
                assert actions == ["ecr:GetAuthorizationToken"], f"Resource * outside the documented exception: {s}"


# ---- database and compute --------------------------------------------------------------------------

def test_database_is_private_and_encrypted(program):
    [db] = of_type(program, "aws:rds/instance:Instance")
    assert db.inputs.get("publiclyAccessible") is False
    assert db.inputs.get("storageEncrypted") is True
    assert db.inputs.get("engine") == "postgres"


def test_model_services_autoscale(program):
    services = {r.inputs["name"] for r in of_type(program, "aws:ecs/service:Service")}
    assert {"production", "candidate", "router", "mlflow"} <= services
    targets = of_type(program, "aws:appautoscaling/target:Target")
    assert {t.name.rsplit("-", 1)[-1] for t in targets} == {"production", "candidate"}
    assert all(t.inputs["scalableDimension"] == "ecs:service:DesiredCount" for t in targets)
    assert len(of_type(program, "aws:appautoscaling/policy:Policy")) == 2
    # Each variant's servers expect at least the autoscaling floor of them (AbfleetReplicasMissing).
    floors = {t.name.rsplit("-", 1)[-1]: int(t.inputs["minCapacity"]) for t in targets}
    for td in of_type(program, "aws:ecs/taskDefinition:TaskDefinition"):
        for container in json.loads(td.inputs["containerDefinitions"]):
            if container["name"] == "server":
                env = {e["name"]: e["value"] for e in container["environment"]}
                assert env["ABFLEET_REPLICAS"] == str(floors[env["VARIANT"]]), (td.name, env)


def test_task_definitions_keep_secrets_out_of_the_environment(program):
    for td in of_type(program, "aws:ecs/taskDefinition:TaskDefinition"):
        for container in json.loads(td.inputs["containerDefinitions"]):
            names = {e["name"] for e in container.get("environment", [])}
            assert not names & {"DATABASE_URL", "MLFLOW_BACKEND_STORE_URI", "AWS_SECRET_ACCESS_KEY"}, (td.name, names)
            text = json.dumps(container.get("environment", []))
            assert TEST_CONFIG["abfleet:dbPassword"] not in text


def test_model_tasks_migrate_the_store_before_the_server_starts(program):
    families = set()
    for td in of_type(program, "aws:ecs/taskDefinition:TaskDefinition"):
        containers = {c["name"]: c for c in json.loads(td.inputs["containerDefinitions"])}
        if "server" not in containers:
            continue
        families.add(td.inputs["family"].rsplit("-", 1)[-1])
        migrate, server = containers["migrate"], containers["server"]
        assert migrate["command"] == ["abfleet", "db", "upgrade"] and migrate["essential"] is False
        assert migrate["image"] == server["image"], "the migration runs the servers' own code"
        assert migrate["secrets"] == server["secrets"], "the migration and the server use one database"
        assert not migrate.get("portMappings")
        # Finished, not necessarily succeeded: a server starts without its database.
        assert server["dependsOn"] == [{"containerName": "migrate", "condition": "COMPLETE"}]
        # A stopping server drains its spool before it is killed (gunicorn's graceful 20 s).
        assert 20 < server["stopTimeout"] <= 120, server.get("stopTimeout")
    assert families == {"production", "candidate"}


def test_router_and_servers_share_one_candidate_weight(program):
    weights = {}
    for td in of_type(program, "aws:ecs/taskDefinition:TaskDefinition"):
        for container in json.loads(td.inputs["containerDefinitions"]):
            env = {e["name"]: e["value"] for e in container.get("environment", [])}
            if "ABFLEET_CANDIDATE_WEIGHT" in env:
                weights[td.inputs["family"]] = env["ABFLEET_CANDIDATE_WEIGHT"]
    assert {family.rsplit("-", 1)[-1] for family in weights} == {"production", "candidate", "router"}, weights
    assert set(weights.values()) == {"20"}


def test_four_image_repositories(program):
    names = {r.inputs["name"].rsplit("/", 1)[-1] for r in of_type(program, "aws:ecr/repository:Repository")}
    assert names == {"inference", "router", "mlflow", "airflow"}


# ---- tags ---------------------------------------------------------------------------------------------

def test_every_taggable_resource_has_explicit_tags(program):
    untagged = []
    for r in program:
        if not r.custom or not r.typ.startswith("aws:") or not accepts_tags(r.typ):
            continue
        tags = r.inputs.get("tags") or {}
        if not all(tags.get(k) for k in ("project", "environment", "managed-by")):
            untagged.append(f"{r.typ} {r.name}")
    assert not untagged, "resources without the common tags:\n" + "\n".join(untagged)


def test_provider_sets_default_tags(program):
    providers = [r for r in program if r.typ == "pulumi:providers:aws"]
    assert providers, "no explicit aws provider"
    default_tags = providers[0].inputs.get("defaultTags")
    if isinstance(default_tags, str):
        default_tags = json.loads(default_tags)
    assert default_tags["tags"]["project"] == "abfleet"
    assert default_tags["tags"]["owner"] == "platform-team"  # from abfleet:tags


def test_the_router_trusts_x_forwarded_for_only_from_the_alb_subnets(program):
    subnets = {r.inputs["cidrBlock"] for r in of_type(program, "aws:ec2/subnet:Subnet")
               if r.inputs["tags"].get("tier") == "public"}
    [router] = [td for td in of_type(program, "aws:ecs/taskDefinition:TaskDefinition")
                if td.inputs["family"].endswith("-router")]
    [container] = json.loads(router.inputs["containerDefinitions"])
    env = {e["name"]: e["value"] for e in container["environment"]}
    trusted = set(env["ABFLEET_ROUTER_TRUSTED_PROXIES"].split(","))
    assert subnets and trusted == subnets, (trusted, subnets)


def test_model_servers_are_checked_for_liveness_not_for_the_database(program):
    # A container health check that needed the database or a model would have ECS replace
    # tasks (losing their prediction spools) during a database outage or before training.
    checked = {}
    for td in of_type(program, "aws:ecs/taskDefinition:TaskDefinition"):
        for container in json.loads(td.inputs["containerDefinitions"]):
            if container.get("healthCheck"):
                checked[td.inputs["family"].rsplit("-", 1)[-1]] = " ".join(container["healthCheck"]["command"])
    for variant in ("production", "candidate"):
        assert "/api/live" in checked[variant] and "/api/health" not in checked[variant], checked[variant]
    # The load balancer's targets are routers: the router answers for itself.
    [group] = of_type(program, "aws:lb/targetGroup:TargetGroup")
    assert group.inputs["healthCheck"]["path"] == "/router/health"
