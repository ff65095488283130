"""VPC with two public subnets (the ALB, the NAT gateway) and two private subnets (every
task and the database), and one security group per tier.

Traffic allowed, and nothing else:
  internet --80/443--> ALB --router_port--> router --model_port--> model servers
  model servers --mlflow_port--> MLflow;  model servers, MLflow --db_port--> PostgreSQL
  every task --443--> AWS APIs (ECR, S3, Secrets Manager, CloudWatch Logs) via the NAT
  gateway or the S3 gateway endpoint.
A model server port is never open to 0.0.0.0/0: only the router's security group reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import pulumi
import pulumi_aws as aws

from abfleet_iac._util import tags_for

ANYWHERE = "0.0.0.0/0"


@dataclass
class NetworkArgs:
    name: str
    region: str
    tags: dict[str, str]
    cidr_block: str = "10.40.0.0/16"
    # Two AZs; None asks AWS for the first two available in the region.
    availability_zones: Optional[Sequence[str]] = None
    public_subnet_cidrs: Sequence[str] = ("10.40.0.0/20", "10.40.16.0/20")
    private_subnet_cidrs: Sequence[str] = ("10.40.128.0/20", "10.40.144.0/20")
    router_port: int = 7000
    model_port: int = 8000
    mlflow_port: int = 5000
    db_port: int = 5432
    # One NAT gateway (cost) serves both private subnets; the S3 endpoint keeps model
    # downloads off it.
    nat_gateway: bool = True
    alb_ingress_cidrs: Sequence[str] = field(default_factory=lambda: [ANYWHERE])


class Network(pulumi.ComponentResource):
    def __init__(self, resource_name: str, args: NetworkArgs, opts: Optional[pulumi.ResourceOptions] = None):
        super().__init__("abfleet:aws:Network", resource_name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        n, tags = args.name, args.tags

        self.vpc = aws.ec2.Vpc(
            f"{n}-vpc", cidr_block=args.cidr_block, enable_dns_hostnames=True, enable_dns_support=True,
            tags=tags_for(tags, f"{n}-vpc"), opts=child)

        if args.availability_zones:
            azs = [pulumi.Output.from_input(z) for z in args.availability_zones[:2]]
        else:
            names = aws.get_availability_zones_output(state="available", opts=pulumi.InvokeOutputOptions(parent=self)).names
            azs = [names.apply(lambda ns, i=i: ns[i]) for i in range(2)]

        self.igw = aws.ec2.InternetGateway(f"{n}-igw", vpc_id=self.vpc.id, tags=tags_for(tags, f"{n}-igw"), opts=child)
        public_rt = aws.ec2.RouteTable(f"{n}-public-rt", vpc_id=self.vpc.id, tags=tags_for(tags, f"{n}-public"), opts=child)
        aws.ec2.Route(f"{n}-public-default", route_table_id=public_rt.id, destination_cidr_block=ANYWHERE,
                      gateway_id=self.igw.id, opts=child)

        self.public_subnets: list[aws.ec2.Subnet] = []
        self.private_subnets: list[aws.ec2.Subnet] = []
        for i, (az, cidr) in enumerate(zip(azs, args.public_subnet_cidrs)):
            subnet = aws.ec2.Subnet(
                f"{n}-public-{i}", vpc_id=self.vpc.id, cidr_block=cidr, availability_zone=az,
                map_public_ip_on_launch=False, tags=tags_for(tags, f"{n}-public-{i}", tier="public"), opts=child)
            aws.ec2.RouteTableAssociation(f"{n}-public-{i}", subnet_id=subnet.id, route_table_id=public_rt.id, opts=child)
            self.public_subnets.append(subnet)

        private_rt = aws.ec2.RouteTable(f"{n}-private-rt", vpc_id=self.vpc.id, tags=tags_for(tags, f"{n}-private"), opts=child)
        if args.nat_gateway:
            eip = aws.ec2.Eip(f"{n}-nat-eip", domain="vpc", tags=tags_for(tags, f"{n}-nat"), opts=child)
            self.nat = aws.ec2.NatGateway(
                f"{n}-nat", allocation_id=eip.id, subnet_id=self.public_subnets[0].id,
                tags=tags_for(tags, f"{n}-nat"), opts=pulumi.ResourceOptions(parent=self, depends_on=[self.igw]))
            aws.ec2.Route(f"{n}-private-default", route_table_id=private_rt.id, destination_cidr_block=ANYWHERE,
                          nat_gateway_id=self.nat.id, opts=child)
        for i, (az, cidr) in enumerate(zip(azs, args.private_subnet_cidrs)):
            subnet = aws.ec2.Subnet(
                f"{n}-private-{i}", vpc_id=self.vpc.id, cidr_block=cidr, availability_zone=az,
                map_public_ip_on_launch=False, tags=tags_for(tags, f"{n}-private-{i}", tier="private"), opts=child)
            aws.ec2.RouteTableAssociation(f"{n}-private-{i}", subnet_id=subnet.id, route_table_id=private_rt.id, opts=child)
            self.private_subnets.append(subnet)

        self.s3_endpoint = aws.ec2.VpcEndpoint(
            f"{n}-s3", vpc_id=self.vpc.id, vpc_endpoint_type="Gateway",
            service_name=f"com.amazonaws.{args.region}.s3",
            route_table_ids=[private_rt.id], tags=tags_for(tags, f"{n}-s3"), opts=child)

        # ---- security groups -------------------------------------------------------------
        def group(tier: str, description: str) -> aws.ec2.SecurityGroup:
            return aws.ec2.SecurityGroup(
                f"{n}-{tier}", vpc_id=self.vpc.id, description=description,
                tags=tags_for(tags, f"{n}-{tier}", tier=tier), opts=child)

        self.alb_sg = group("alb", "abfleet ALB: HTTP(S) from the internet")
        self.router_sg = group("router", "abfleet router tasks: only from the ALB")
        self.model_sg = group("model", "abfleet model servers: only from the router")
        self.mlflow_sg = group("mlflow", "abfleet MLflow: only from the model servers")
        self.db_sg = group("db", "abfleet PostgreSQL: only from the model servers and MLflow")

        self.ingress_rules: dict[str, aws.vpc.SecurityGroupIngressRule] = {}

        def ingress(rule: str, sg, port: int, *, cidr: Optional[str] = None, source=None, what: str = ""):
            self.ingress_rules[rule] = aws.vpc.SecurityGroupIngressRule(
                f"{n}-{rule}", security_group_id=sg.id, ip_protocol="tcp", from_port=port, to_port=port,
                cidr_ipv4=cidr, referenced_security_group_id=source.id if source is not None else None,
                description=what, tags=tags_for(tags, f"{n}-{rule}"), opts=child)

        def egress(rule: str, sg, port: int, *, cidr: Optional[str] = None, dest=None, what: str = ""):
            aws.vpc.SecurityGroupEgressRule(
                f"{n}-{rule}", security_group_id=sg.id, ip_protocol="tcp", from_port=port, to_port=port,
                cidr_ipv4=cidr, referenced_security_group_id=dest.id if dest is not None else None,
                description=what, tags=tags_for(tags, f"{n}-{rule}"), opts=child)

        for j, cidr in enumerate(args.alb_ingress_cidrs):
            ingress(f"alb-http-{j}", self.alb_sg, 80, cidr=cidr, what="HTTP from clients")
            ingress(f"alb-https-{j}", self.alb_sg, 443, cidr=cidr, what="HTTPS from clients")
        egress("alb-to-router", self.alb_sg, args.router_port, dest=self.router_sg, what="to the router tasks")

        ingress("router-from-alb", self.router_sg, args.router_port, source=self.alb_sg, what="from the ALB")
        egress("router-to-model", self.router_sg, args.model_port, dest=self.model_sg, what="to the model servers")
        egress("router-https", self.router_sg, 443, cidr=ANYWHERE, what="AWS APIs (ECR, logs)")

        ingress("model-from-router", self.model_sg, args.model_port, source=self.router_sg, what="from the router only")
        egress("model-to-mlflow", self.model_sg, args.mlflow_port, dest=self.mlflow_sg, what="model registry")
        egress("model-to-db", self.model_sg, args.db_port, dest=self.db_sg, what="predictions and feedback")
        egress("model-https", self.model_sg, 443, cidr=ANYWHERE, what="AWS APIs (ECR, S3, logs, secrets)")

        ingress("mlflow-from-model", self.mlflow_sg, args.mlflow_port, source=self.model_sg, what="from the model servers")
        egress("mlflow-to-db", self.mlflow_sg, args.db_port, dest=self.db_sg, what="tracking store")
        egress("mlflow-https", self.mlflow_sg, 443, cidr=ANYWHERE, what="AWS APIs (ECR, S3, logs, secrets)")

        ingress("db-from-model", self.db_sg, args.db_port, source=self.model_sg, what="from the model servers")
        ingress("db-from-mlflow", self.db_sg, args.db_port, source=self.mlflow_sg, what="from MLflow")

        self.vpc_id = self.vpc.id
        self.public_subnet_ids = [s.id for s in self.public_subnets]
        self.private_subnet_ids = [s.id for s in self.private_subnets]
        # The ALB's nodes live here: the router trusts X-Forwarded-For from these ranges only.
        self.public_subnet_cidrs = list(args.public_subnet_cidrs)
        self.register_outputs({
            "vpc_id": self.vpc_id,
            "public_subnet_ids": self.public_subnet_ids,
            "private_subnet_ids": self.private_subnet_ids,
        })
