"""ECS on Fargate: the production and candidate model servers, the router behind a public
ALB, and MLflow; autoscaling on the two model services.

Names inside the cluster come from ECS Service Connect (one Cloud Map namespace): the
router image's upstreams `infer-prod:8000` / `infer-cand:8000` and the servers'
`http://mlflow:5000` resolve exactly as they do in docker-compose. Service Connect puts a
proxy behind each name and balances over every task, so the router's nginx (which
resolves its upstream names once, at start) keeps working while the services scale.

Every task runs in the private subnets without a public IP; only the ALB is public.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

import pulumi
import pulumi_aws as aws

from abfleet_iac._util import policy_output, tags_for

# A model server is alive when /api/live answers 200: no model and no database needed, so
# ECS does not replace a task (and lose its prediction spool) for a database outage or
# before the first model is trained. Readiness is /api/ready.
LIVENESS = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/api/live', timeout=4)"

# Seconds ECS waits after SIGTERM before it kills a model server (Fargate allows up to 120):
# room for gunicorn's graceful shutdown (20 s), in which every worker inserts its spool. The
# spool is on the task's ephemeral storage: rows the database does not take by then are lost
# with the task, so a deploy or scale-in during a database outage is the one case that loses
# answers on AWS (compose keeps the spool on a volume).
SERVER_STOP_TIMEOUT_S = 60

# The container of a model server's task that runs the store's migrations before the server.
MIGRATE_CONTAINER = "migrate"

# MLflow's task first makes sure its database exists on the shared RDS instance.
CREATE_DATABASE = (
    "import os, psycopg2\n"
    "from urllib.parse import urlsplit, urlunsplit\n"
    "parts = urlsplit(os.environ['MLFLOW_BACKEND_STORE_URI'])\n"
    "name = parts.path.lstrip('/')\n"
    "conn = psycopg2.connect(urlunsplit(parts._replace(path='/postgres')))\n"
    "conn.autocommit = True\n"
    "cur = conn.cursor()\n"
    "cur.execute('SELECT 1 FROM pg_database WHERE datname = %s', (name,))\n"
    "if cur.fetchone() is None:\n"
    "    cur.execute('CREATE DATABASE \"%s\"' % name.replace('\"', '\"\"'))\n"
    "print('database', name, 'ready')\n"
)


@dataclass
class ServiceSize:
    cpu: int = 512
    memory: int = 1024
    desired_count: int = 2
    min_count: int = 1
    max_count: int = 6


@dataclass
class ComputeArgs:
    name: str
    region: str
    tags: dict[str, str]
    vpc_id: pulumi.Input[str]
    public_subnet_ids: Sequence[pulumi.Input[str]]
    private_subnet_ids: Sequence[pulumi.Input[str]]
    alb_security_group_id: pulumi.Input[str]
    router_security_group_id: pulumi.Input[str]
    model_security_group_id: pulumi.Input[str]
    mlflow_security_group_id: pulumi.Input[str]
    # image name (inference, router, mlflow) -> repository URL
    repository_urls: dict[str, pulumi.Input[str]]
    image_tag: str
    execution_role_arn: pulumi.Input[str]
    execution_role_name: pulumi.Input[str]
    serving_role_arn: pulumi.Input[str]
    mlflow_role_arn: pulumi.Input[str]
    database_url_secret_arn: pulumi.Input[str]
    mlflow_backend_secret_arn: pulumi.Input[str]
    bucket_name: pulumi.Input[str]
    model_prefix: str = "mlflow"
    model_name: str = "bengaluru-home-price"
    # The candidate's share of users, in percent: set once here for the router (which renders
    # its config from it at start) and the model servers (the production one exports it).
    candidate_weight: int = 20
    certificate_arn: Optional[str] = None
    # Where the ALB's requests come from (its subnets' CIDRs): the router takes the client's
    # address from X-Forwarded-For only from these, so each person is limited on their own.
    trusted_proxy_cidrs: Sequence[str] = ()
    production: ServiceSize = field(default_factory=ServiceSize)
    candidate: ServiceSize = field(default_factory=lambda: ServiceSize(desired_count=1, min_count=1, max_count=3))
    router: ServiceSize = field(default_factory=lambda: ServiceSize(cpu=256, memory=512, desired_count=2, min_count=2, max_count=2))
    mlflow: ServiceSize = field(default_factory=lambda: ServiceSize(cpu=1024, memory=2048, desired_count=1, min_count=1, max_count=1))
    target_cpu_percent: float = 60.0
    log_retention_days: int = 30
    router_port: int = 7000
    model_port: int = 8000
    mlflow_port: int = 5000


class Compute(pulumi.ComponentResource):
    def __init__(self, resource_name: str, args: ComputeArgs, opts: Optional[pulumi.ResourceOptions] = None):
        super().__init__("abfleet:aws:Compute", resource_name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        n, tags = args.name, args.tags

        # ---- logs ---------------------------------------------------------------------------
        self.log_groups = {
            svc: aws.cloudwatch.LogGroup(
                f"{n}-{svc}", name=f"/abfleet/{n}/{svc}", retention_in_days=args.log_retention_days,
                tags=tags_for(tags, f"{n}-{svc}", service=svc), opts=child)
            for svc in ("production", "candidate", "router", "mlflow")
        }
        log_resources = []
        for lg in self.log_groups.values():
            log_resources += [lg.arn, pulumi.Output.concat(lg.arn, ":log-stream:*")]
        aws.iam.RolePolicy(
            f"{n}-task-execution-logs", role=args.execution_role_name,
            policy=policy_output({"Sid": "WriteAbfleetLogs", "Effect": "Allow",
                                  "Action": ["logs:CreateLogStream", "logs:PutLogEvents"], "Resource": log_resources}),
            opts=child)

        def logging(svc: str) -> dict:
            return {"logDriver": "awslogs", "options": {
                "awslogs-group": self.log_groups[svc].name, "awslogs-region": args.region, "awslogs-stream-prefix": svc}}

        # ---- cluster and service discovery -------------------------------------------------
        self.namespace = aws.servicediscovery.HttpNamespace(
            f"{n}-ns", name=f"{n}.internal", description=f"{n}: Service Connect names",
            tags=tags_for(tags, f"{n}-ns"), opts=child)
        self.cluster = aws.ecs.Cluster(
            f"{n}-cluster", name=n,
            settings=[{"name": "containerInsights", "value": "enabled"}],
            service_connect_defaults={"namespace": self.namespace.arn},
            tags=tags_for(tags, f"{n}-cluster"), opts=child)

        # ---- public entry: ALB -> router ---------------------------------------------------
        self.alb = aws.lb.LoadBalancer(
            f"{n}-alb", load_balancer_type="application", internal=False,
            security_groups=[args.alb_security_group_id], subnets=list(args.public_subnet_ids),
            drop_invalid_header_fields=True, idle_timeout=60,
            tags=tags_for(tags, f"{n}-alb"), opts=child)
        self.router_tg = aws.lb.TargetGroup(
            f"{n}-router", port=args.router_port, protocol="HTTP", target_type="ip", vpc_id=args.vpc_id,
            deregistration_delay=30,
            health_check={"path": "/router/health", "matcher": "200", "interval": 15, "timeout": 5,
                          "healthy_threshold": 2, "unhealthy_threshold": 3},
            tags=tags_for(tags, f"{n}-router"), opts=child)
        forward = [{"type": "forward", "target_group_arn": self.router_tg.arn}]
        if args.certificate_arn:
            https = aws.lb.Listener(
                f"{n}-https", load_balancer_arn=self.alb.arn, port=443, protocol="HTTPS",
                certificate_arn=args.certificate_arn, ssl_policy="ELBSecurityPolicy-TLS13-1-2-2021-06",
                default_actions=forward, tags=tags_for(tags, f"{n}-https"), opts=child)
            http = aws.lb.Listener(
                f"{n}-http", load_balancer_arn=self.alb.arn, port=80, protocol="HTTP",
                default_actions=[{"type": "redirect",
                                  "redirect": {"port": "443", "protocol": "HTTPS", "status_code": "HTTP_301"}}],
                tags=tags_for(tags, f"{n}-http"), opts=child)
            self.listeners = [https, http]
        else:
            # No certificate configured (a dev stack): plain HTTP. Set abfleet:certificateArn for HTTPS.
            self.listeners = [aws.lb.Listener(
                f"{n}-http", load_balancer_arn=self.alb.arn, port=80, protocol="HTTP",
                default_actions=forward, tags=tags_for(tags, f"{n}-http"), opts=child)]

        def image(kind: str) -> pulumi.Output[str]:
            return pulumi.Output.concat(args.repository_urls[kind], ":", args.image_tag)

        def task(svc: str, size: ServiceSize, containers: pulumi.Input[list], task_role_arn=None) -> aws.ecs.TaskDefinition:
            return aws.ecs.TaskDefinition(
                f"{n}-{svc}", family=f"{n}-{svc}", requires_compatibilities=["FARGATE"], network_mode="awsvpc",
                cpu=str(size.cpu), memory=str(size.memory),
                runtime_platform={"operating_system_family": "LINUX", "cpu_architecture": "X86_64"},
                execution_role_arn=args.execution_role_arn, task_role_arn=task_role_arn,
                container_definitions=pulumi.Output.from_input(containers).apply(json.dumps),
                tags=tags_for(tags, f"{n}-{svc}", service=svc), opts=child)

        def service(svc: str, size: ServiceSize, task_def, security_group, connect: Optional[dict], *,
                    load_balancers=None, depends_on=(), autoscaled: bool = False) -> aws.ecs.Service:
            return aws.ecs.Service(
                f"{n}-{svc}", name=svc, cluster=self.cluster.arn, task_definition=task_def.arn,
                launch_type="FARGATE", desired_count=size.desired_count,
                network_configuration={"subnets": list(args.private_subnet_ids),
                                       "security_groups": [security_group], "assign_public_ip": False},
                service_connect_configuration={"enabled": True, "namespace": self.namespace.arn,
                                               **({"services": [connect]} if connect else {})},
                load_balancers=load_balancers,
                health_check_grace_period_seconds=60 if load_balancers else None,
                deployment_circuit_breaker={"enable": True, "rollback": True},
                deployment_minimum_healthy_percent=100, deployment_maximum_percent=200,
                enable_ecs_managed_tags=True, propagate_tags="SERVICE",
                tags=tags_for(tags, f"{n}-{svc}", service=svc),
                opts=pulumi.ResourceOptions(
                    parent=self, depends_on=list(depends_on),
                    # The autoscaler owns the count once the service exists.
                    ignore_changes=["desiredCount"] if autoscaled else None))

        def connect(discovery: str, port: int) -> dict:
            return {"port_name": "http", "discovery_name": discovery,
                    "client_alias": [{"port": port, "dns_name": discovery}]}

        # ---- MLflow -------------------------------------------------------------------------
        mlflow_secret = [{"name": "MLFLOW_BACKEND_STORE_URI", "valueFrom": args.mlflow_backend_secret_arn}]
        mlflow_containers = [
            {"name": "create-database", "image": image("mlflow"), "essential": False,
             "command": ["python", "-c", CREATE_DATABASE], "secrets": mlflow_secret,
             "logConfiguration": logging("mlflow")},
            {"name": "mlflow", "image": image("mlflow"), "essential": True,
             "command": ["mlflow", "server", "--serve-artifacts"],
             "dependsOn": [{"containerName": "create-database", "condition": "SUCCESS"}],
             "portMappings": [{"name": "http", "containerPort": args.mlflow_port, "protocol": "tcp", "appProtocol": "http"}],
             "environment": [
                 {"name": "MLFLOW_HOST", "value": "0.0.0.0"},
                 {"name": "MLFLOW_PORT", "value": str(args.mlflow_port)},
                 {"name": "MLFLOW_WORKERS", "value": "2"},
                 {"name": "MLFLOW_ARTIFACTS_DESTINATION",
                  "value": pulumi.Output.concat("s3://", args.bucket_name, f"/{args.model_prefix.strip('/')}")},
                 {"name": "MLFLOW_SERVER_ALLOWED_HOSTS",
                  "value": f"mlflow,mlflow:{args.mlflow_port},localhost,localhost:{args.mlflow_port}"},
                 {"name": "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "value": "false"},
                 {"name": "AWS_DEFAULT_REGION", "value": args.region},
             ],
             "secrets": mlflow_secret,
             "healthCheck": {"command": ["CMD", "python", "-c",
                                         f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{args.mlflow_port}/health', timeout=4)"],
                             "interval": 15, "timeout": 5, "retries": 3, "startPeriod": 90},
             "logConfiguration": logging("mlflow")},
        ]
        self.mlflow_task = task("mlflow", args.mlflow, mlflow_containers, args.mlflow_role_arn)
        self.mlflow_service = service("mlflow", args.mlflow, self.mlflow_task, args.mlflow_security_group_id,
                                      connect("mlflow", args.mlflow_port))

        # ---- model servers -----------------------------------------------------------------
        # Each task first runs the store's migrations (`abfleet db upgrade`: idempotent, one
        # migrator at a time) in a container that exits; servers never run DDL. The server
        # waits for it to finish, not to succeed: with the database down, a replacement
        # server still starts and answers (its predictions wait in the spool).
        def model_containers(variant: str, size: ServiceSize) -> list:
            database_url = [{"name": "DATABASE_URL", "valueFrom": args.database_url_secret_arn}]
            return [{
                "name": MIGRATE_CONTAINER, "image": image("inference"), "essential": False,
                "command": ["abfleet", "db", "upgrade"],
                "secrets": database_url,
                "logConfiguration": logging(variant),
            }, {
                "name": "server", "image": image("inference"), "essential": True,
                "command": ["abfleet", "serve"],
                "dependsOn": [{"containerName": MIGRATE_CONTAINER, "condition": "COMPLETE"}],
                "portMappings": [{"name": "http", "containerPort": args.model_port, "protocol": "tcp", "appProtocol": "http"}],
                "environment": [
                    {"name": "VARIANT", "value": variant},
                    {"name": "ABFLEET_BIND", "value": f"0.0.0.0:{args.model_port}"},
                    {"name": "ABFLEET_MODEL_NAME", "value": args.model_name},
                    {"name": "ABFLEET_WORKERS", "value": "2"},
                    # The servers the variant should have at least (AbfleetReplicasMissing):
                    # autoscaling never goes below its floor.
                    {"name": "ABFLEET_REPLICAS", "value": str(size.min_count)},
                    {"name": "ABFLEET_CANDIDATE_WEIGHT", "value": str(args.candidate_weight)},
                    {"name": "MLFLOW_TRACKING_URI", "value": f"http://mlflow:{args.mlflow_port}"},
                    {"name": "AWS_DEFAULT_REGION", "value": args.region},
                ],
                "secrets": database_url,
                # A stopping task first drains: gunicorn's workers finish their requests and
                # insert their spool (graceful_timeout 20 s) before ECS kills the container.
                "stopTimeout": SERVER_STOP_TIMEOUT_S,
                "healthCheck": {"command": ["CMD", "python", "-c", LIVENESS.format(port=args.model_port)],
                                "interval": 15, "timeout": 5, "retries": 3, "startPeriod": 60},
                "logConfiguration": logging(variant),
            }]

        self.model_services: dict[str, aws.ecs.Service] = {}
        self.scaling_targets: dict[str, aws.appautoscaling.Target] = {}
        for variant, discovery, size in (("production", "infer-prod", args.production),
                                         ("candidate", "infer-cand", args.candidate)):
            td = task(variant, size, model_containers(variant, size), args.serving_role_arn)
            svc = service(variant, size, td, args.model_security_group_id, connect(discovery, args.model_port),
                          depends_on=[self.mlflow_service], autoscaled=True)
            target = aws.appautoscaling.Target(
                f"{n}-{variant}", service_namespace="ecs", scalable_dimension="ecs:service:DesiredCount",
                resource_id=pulumi.Output.concat("service/", self.cluster.name, "/", svc.name),
                min_capacity=size.min_count, max_capacity=size.max_count,
                tags=tags_for(tags, f"{n}-{variant}-scaling", service=variant), opts=child)
            aws.appautoscaling.Policy(
                f"{n}-{variant}-cpu", policy_type="TargetTrackingScaling",
                service_namespace=target.service_namespace, scalable_dimension=target.scalable_dimension,
                resource_id=target.resource_id,
                target_tracking_scaling_policy_configuration={
                    "predefined_metric_specification": {"predefined_metric_type": "ECSServiceAverageCPUUtilization"},
                    "target_value": args.target_cpu_percent,
                    "scale_in_cooldown": 120, "scale_out_cooldown": 60,
                },
                opts=child)
            self.model_services[variant] = svc
            self.scaling_targets[variant] = target

        # ---- router --------------------------------------------------------------------------
        router_containers = [{
            "name": "router", "image": image("router"), "essential": True,
            "portMappings": [{"name": "http", "containerPort": args.router_port, "protocol": "tcp", "appProtocol": "http"}],
            # The image renders its nginx config from these at start.
            "environment": [
                {"name": "ABFLEET_CANDIDATE_WEIGHT", "value": str(args.candidate_weight)},
                {"name": "ABFLEET_ROUTER_PORT", "value": str(args.router_port)},
                {"name": "ABFLEET_ROUTER_TRUSTED_PROXIES", "value": ",".join(args.trusted_proxy_cidrs)},
            ],
            "healthCheck": {"command": ["CMD", "wget", "-q", "-O", "/dev/null",
                                        f"http://127.0.0.1:{args.router_port}/router/health"],
                            "interval": 10, "timeout": 3, "retries": 3, "startPeriod": 10},
            "logConfiguration": logging("router"),
        }]
        self.router_task = task("router", args.router, router_containers)
        self.router_service = service(
            "router", args.router, self.router_task, args.router_security_group_id, None,
            load_balancers=[{"target_group_arn": self.router_tg.arn, "container_name": "router",
                             "container_port": args.router_port}],
            depends_on=[*self.listeners, *self.model_services.values()])

        self.url = pulumi.Output.concat("https://" if args.certificate_arn else "http://", self.alb.dns_name, "/")
        self.register_outputs({"url": self.url, "cluster": self.cluster.name})
