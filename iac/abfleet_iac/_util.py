"""Small helpers shared by the components."""

from __future__ import annotations

import json
from typing import Any, Mapping

import pulumi


def tags_for(common: Mapping[str, str], name: str, **extra: str) -> dict[str, str]:
    """The common tags plus a Name (and any extra), for one resource."""
    return {**common, "Name": name, **extra}


def policy_document(*statements: Mapping[str, Any]) -> str:
    """An IAM policy document as JSON text."""
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def policy_output(*statements: Mapping[str, Any]) -> pulumi.Output[str]:
    """Like policy_document, for statements that hold Outputs (ARNs)."""
    return pulumi.Output.from_input(list(statements)).apply(lambda s: policy_document(*s))


def assume_role_policy(service: str) -> str:
    return policy_document({
        "Effect": "Allow",
        "Principal": {"Service": service},
        "Action": "sts:AssumeRole",
    })
