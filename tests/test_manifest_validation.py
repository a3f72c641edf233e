"""The cluster manifests through the real validators that run offline.

- cluster/gpu-cluster.yaml through Ray's own launcher code (the installed ray): its AWS defaults
  merged and its schema checked as `ray up` does (``prepare_config``, ``validate_config``), then
  its AWS bootstrap (``_bootstrap_config``: subnets, availability zones, security group, key
  pair, instance profile) and a worker launch of each node type (on-demand, spot) through Ray's
  AWS node provider, against a moto EC2/IAM server on 127.0.0.1 holding the security group,
  subnets, roles, policies and instance profiles that cluster/aws/*.json describe (moto refuses
  a malformed policy document and a launch with an instance profile that does not exist).
- the Kubernetes objects with kubernetes-validate (the StorageClass, claim and NetworkPolicy, and
  the RayJob's pod templates as core Pods; the RayJob itself is KubeRay's CRD, which no PyPI
  package ships, so its fields are checked in tests/test_cluster_manifests.py).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from moto_s3 import CREDENTIALS, moto_server

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
AWS = CLUSTER / "aws"
KUBERNETES_VERSION = "1.37.0"  # the newest schema kubernetes-validate==1.37.0 ships

# Placeholders in cluster/gpu-cluster.yaml and cluster/aws/*.json, replaced by moto's ids.
SG, AMI = "sg-0123456789abcdef0", "ami-0123456789abcdef0"
SUBNETS = {"subnet-0123456789abcdef0": "us-west-2a", "subnet-0fedcba9876543210": "us-west-2b"}
ACCOUNT = "123456789012"  # moto's account, and the placeholder account of the ARNs

# What Ray's autoscaler on the head calls to run the workers (ray/autoscaler/_private/aws/
# node_provider.py: create_instances with tags and an instance profile, describe, terminate).
AUTOSCALER_ACTIONS = [
    "ec2:RunInstances",
    "ec2:CreateTags",
    "ec2:DescribeInstances",
    "ec2:DescribeInstanceTypes",
    "ec2:TerminateInstances",
    "iam:PassRole",
]
STORAGE_ACTIONS = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"]


def _ray_config(text: str | None = None) -> dict:
    return yaml.safe_load(text if text is not None else (CLUSTER / "gpu-cluster.yaml").read_text())


def _merged(config: dict) -> dict:
    """The config as `ray up` sees it: Ray's AWS defaults merged in, node types filled out."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(config))


def test_ray_validates_the_cluster_config_with_its_aws_defaults_merged():
    from ray.autoscaler._private.util import validate_config

    merged = _merged(_ray_config())
    validate_config(merged)  # Ray's ray-schema.json and its own consistency checks
    # the head's setup as Ray runs it (setup_commands + head_setup_commands): boto3 goes into the
    # venv Ray (and so its autoscaler) runs from; no bare `pip install` (Ray's default, no pip in
    # a uv venv), and the import is checked
    head_setup = merged["head_setup_commands"]
    assert not any(re.match(r"\s*pip3? install", c) for c in head_setup), head_setup
    installs = [c for c in head_setup if "boto3" in c and "install" in c]
    assert installs and all("--python ~/venv/bin/python" in c for c in installs), installs
    assert any(c.startswith("~/venv/bin/python -c") and "import boto3" in c for c in head_setup)
    starts = merged["head_start_ray_commands"]
    assert any(c.strip().startswith("export PATH=$HOME/venv/bin:$PATH") for c in starts)


def test_the_ray_cluster_launches_only_into_subnets_of_the_listed_zones_and_waits_for_apt():
    cfg = _ray_config()
    zones = [z.strip() for z in cfg["provider"]["availability_zone"].split(",")]
    for node_type in cfg["available_node_types"].values():
        subnets = node_type["node_config"]["SubnetIds"]
        assert subnets and sorted(SUBNETS[s] for s in subnets) == sorted(zones)
    init = "\n".join(cfg["initialization_commands"])
    assert "cloud-init status --wait" in init
    for apt in re.findall(r"apt-get[^&\n]*", init):
        assert "DPkg::Lock::Timeout=" in apt, apt


def test_the_ray_cluster_asks_for_the_token_and_keeps_its_dashboard_on_the_head():
    cfg = _ray_config()
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    head_start = "\n".join(cfg["head_start_ray_commands"])
    worker_start = "\n".join(cfg["worker_start_ray_commands"])
    for start in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in start
        assert "RAY_AUTH_MODE=disabled" not in start
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "--num-cpus=0" in head_start
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the autoscaler plans with a head that runs nothing
    assert "RAY_JOB_STOP_WAIT_TIME_S=60" in head_start


def _allows(policy: dict, action: str) -> bool:
    """Whether an Allow statement of ``policy`` names ``action`` (wildcards as IAM reads them)."""
    for statement in policy["Statement"]:
        actions = statement["Action"]
        actions = [actions] if isinstance(actions, str) else actions
        if statement["Effect"] == "Allow" and any(
            fnmatch.fnmatchcase(action.lower(), a.lower()) for a in actions
        ):
            return True
    return False


def test_the_head_may_run_the_workers_and_the_workers_only_reach_storage():
    head = json.loads((AWS / "head-policy.json").read_text())
    worker = json.loads((AWS / "worker-policy.json").read_text())
    for action in AUTOSCALER_ACTIONS + STORAGE_ACTIONS:
        assert _allows(head, action), action
    for action in STORAGE_ACTIONS:
        assert _allows(worker, action), action
    assert {
        a.split(":")[0]
        for s in worker["Statement"]
        for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    } == {"s3"}
    (pass_role,) = [s for s in head["Statement"] if s["Action"] == "iam:PassRole"]
    assert pass_role["Resource"] == f"arn:aws:iam::{ACCOUNT}:role/ddpm-ray-worker"
    rules = json.loads((AWS / "ray-sg-ingress.json").read_text())
    within = [r for r in rules if r["IpProtocol"] == "-1"]
    assert [p["GroupId"] for r in within for p in r["UserIdGroupPairs"]] == [SG]
    (ssh,) = [r for r in rules if r["IpProtocol"] == "tcp"]
    assert (ssh["FromPort"], ssh["ToPort"]) == (22, 22)
    assert all(r["CidrIp"].endswith("/32") for r in ssh["IpRanges"])  # the submitter only
    assert not any("0.0.0.0/0" in json.dumps(r) for r in rules)


def _moto_aws(endpoint: str) -> dict[str, str]:
    """Create in moto what docs/cluster.md asks for before `ray up`; the placeholders' ids."""
    import boto3

    ec2 = boto3.client("ec2", region_name="us-west-2")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    ids = {}
    for i, (placeholder, zone) in enumerate(SUBNETS.items()):
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=zone)
        ids[placeholder] = subnet["Subnet"]["SubnetId"]
        ec2.modify_subnet_attribute(SubnetId=ids[placeholder], MapPublicIpOnLaunch={"Value": True})
    ids[SG] = ec2.create_security_group(GroupName="ddpm-ray", Description="Ray", VpcId=vpc)[
        "GroupId"
    ]
    efs_sg = ec2.create_security_group(GroupName="ddpm-efs", Description="EFS", VpcId=vpc)
    for group, rules in (
        (ids[SG], "ray-sg-ingress.json"),
        (efs_sg["GroupId"], "efs-sg-ingress.json"),
    ):
        permissions = json.loads((AWS / rules).read_text().replace(SG, ids[SG]))
        ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=permissions)
    ids[AMI] = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    iam = boto3.client("iam")
    for name in ("head", "worker"):
        role = f"ddpm-ray-{name}"
        iam.create_role(
            RoleName=role, AssumeRolePolicyDocument=(AWS / "ec2-trust.json").read_text()
        )
        iam.put_role_policy(  # as docs/cluster.md does; moto refuses a malformed document
            RoleName=role,
            PolicyName=role,
            PolicyDocument=(AWS / f"{name}-policy.json").read_text(),
        )
        iam.create_instance_profile(InstanceProfileName=role)
        iam.add_role_to_instance_profile(InstanceProfileName=role, RoleName=role)
    return ids


def bootstrap_and_launch(text: str, endpoint: str) -> list[str]:
    """``text`` (a gpu-cluster.yaml) bootstrapped by Ray against ``endpoint``, and a worker
    launched as the head's autoscaler would; every problem found (none: it launches)."""
    import boto3
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.commands import _bootstrap_config

    ids = _moto_aws(endpoint)
    for placeholder, real in ids.items():
        text = text.replace(placeholder, real)
    config = _ray_config(text)
    if (
        "IamInstanceProfile"
        not in config["available_node_types"][config["head_node_type"]]["node_config"]
    ):  # Ray would create its own (EC2 and S3 full access), a profile docs/security.md never names
        return ["the head gets Ray's default instance profile"]
    resolved = _bootstrap_config(config, no_config_cache=True)
    problems = []
    sources = aws_config.get_log_state()  # where each setting came from: config or Ray's default
    if sources["head_instance_profile_src"] != "config":
        problems.append("the head gets Ray's default instance profile")
    for kind in ("subnet_src", "security_group_src"):
        if set(sources[kind].values()) != {"config"}:
            problems.append(f"{kind}: {sources[kind]} (Ray picks them)")
    iam = boto3.client("iam")
    head = resolved["head_node_type"]
    policies, roles = {}, {}
    for name, node_type in resolved["available_node_types"].items():
        arn = node_type["node_config"].get("IamInstanceProfile", {}).get("Arn")
        if arn is None:
            problems.append(f"{name}: no instance profile")
            continue
        profile = iam.get_instance_profile(InstanceProfileName=arn.rsplit("/", 1)[1])
        (role,) = profile["InstanceProfile"]["Roles"]
        roles[name] = role["Arn"]
        policies[name] = [
            iam.get_role_policy(RoleName=role["RoleName"], PolicyName=p)["PolicyDocument"]
            for p in iam.list_role_policies(RoleName=role["RoleName"])["PolicyNames"]
        ]
    for name, documents in policies.items():
        allowed = {a for a in AUTOSCALER_ACTIONS if any(_allows(d, a) for d in documents)}
        if name == head and allowed != set(AUTOSCALER_ACTIONS):
            problems.append(f"the head may not {sorted(set(AUTOSCALER_ACTIONS) - allowed)}")
        if name != head and allowed:
            problems.append(f"{name} may {sorted(allowed)}")
    passed = {
        s["Resource"]
        for d in policies.get(head, [])
        for s in d["Statement"]
        if s["Action"] == "iam:PassRole"
    }
    for name, role in roles.items():
        if name != head and role not in passed:
            problems.append(f"the head may not pass {name}'s role {role}")
    provider = AWSNodeProvider(resolved["provider"], resolved["cluster_name"])
    ec2 = boto3.client("ec2", region_name="us-west-2")
    for name in (n for n in resolved["available_node_types"] if n != head):  # one of each
        node_config = copy.deepcopy(resolved["available_node_types"][name]["node_config"])
        provider.create_node(node_config, {"ray-node-type": "worker"}, 1)  # moto: profile exists
        (node,) = provider.non_terminated_nodes({})
        (instance,) = ec2.describe_instances(InstanceIds=[node])["Reservations"][0]["Instances"]
        if instance["SubnetId"] not in node_config["SubnetIds"]:
            problems.append(f"a {name} worker in {instance['SubnetId']}")
        spot = node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        if (instance.get("InstanceLifecycle") == "spot") != spot:  # moto: "spot" on spot requests
            problems.append(f"a {name} worker's lifecycle: {instance.get('InstanceLifecycle')}")
        provider.terminate_nodes([node])
    group = ec2.describe_security_groups(GroupIds=[ids[SG]])["SecurityGroups"][0]
    if not any(p["IpProtocol"] == "-1" and p["UserIdGroupPairs"] for p in group["IpPermissions"]):
        problems.append("no rule for all traffic within the group")
    return problems


def test_ray_bootstraps_the_cluster_and_launches_a_worker_against_moto(tmp_path, monkeypatch):
    with moto_server(tmp_path / "moto.log") as endpoint:
        monkeypatch.setenv("HOME", str(tmp_path))  # Ray writes its SSH key to ~/.ssh
        for name, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(name, value)
        problems = bootstrap_and_launch((CLUSTER / "gpu-cluster.yaml").read_text(), endpoint)
    assert problems == []
    assert os.path.exists(tmp_path / ".ssh" / "ray-autoscaler_us-west-2.pem")


def _validate_k8s(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name", ["storage-pvc.yaml", "networkpolicy.yaml"])
def test_the_core_kubernetes_objects_are_valid(name):
    docs = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]
    assert docs
    for doc in docs:
        _validate_k8s(doc)


def test_the_rayjob_pod_templates_are_valid_core_pods():
    (job,) = [d for d in yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()) if d]
    spec = job["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for i, group in enumerate(groups):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"pod-{i}"}}
        _validate_k8s({**pod, "spec": group["template"]["spec"]})
