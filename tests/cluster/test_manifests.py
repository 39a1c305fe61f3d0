"""The cluster manifests under cluster/: they parse, pin the installed Ray, run the same `sprout`
command, keep the uploaded working dir small, request GPUs on node types whose allocatable
they fit, need the GPU driver that the pinned torch needs (cluster/gpu-requirements.yaml),
share storage, run MLflow on PostgreSQL with basic auth, carry the commit into submitted
jobs, and keep the dashboard, job API, Ray client, MLflow and database ports private with
Ray's token auth on and only SSH open to the world (cluster/firewall.yaml).

Fast and offline: no Ray cluster, no cloud, no Kubernetes. Ray's own helpers are used where
they define the semantics (runtime_env validation, working-dir packing, the launcher schema,
the KubeRay autoscaler's view of a group, GPU-name detection), and kubernetes-validate's
Kubernetes schemas for every core object and every pod template.
"""

from __future__ import annotations

import configparser
import copy
import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHERS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
# Data read by the tests (and people), never applied.
DATA_FILES = [CLUSTER / "gpu-requirements.yaml", CLUSTER / "firewall.yaml"]
DOCS = REPO / "docs" / "cluster.md"
RAY_VERSION = ray.__version__
PRIVATE_PORTS = {8265, 5000, 10001, 6379, 5432}
# The Kubernetes version whose schemas the core objects must pass (kubernetes-validate).
K8S_VERSION = "1.33.0"
# The first NVIDIA driver branch of each CUDA release (CUDA's release notes, table 3).
MIN_DRIVER_FOR_CUDA = {"12.8": 570, "12.9": 575, "13.0": 580, "13.1": 580, "13.2": 595}
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL", re.IGNORECASE)
MIB = 1024 * 1024
# Repository paths the runtime env must leave out, and ones it must keep.
MUST_EXCLUDE = [
    ".git/config",
    ".venv/lib/python3.11/site-packages/torch/lib/libtorch.so",
    "data/cifar-10-batches-py/data_batch_1",
    "ray_results/demo/checkpoint_000001/model.pt",
    "mlflow.db",
    "mlruns/0/meta.yaml",
    "mlartifacts/1/model.pkl",
    "weights.pt",
    "trainables/__pycache__/loop.cpython-311.pyc",
    ".pytest_cache/v/cache/lastfailed",
    ".ruff_cache/content",
    ".hypothesis/examples/x",
    "sprout_orchestrator.egg-info/PKG-INFO",
    "benchmarks/results/step_cost.json",
]
MUST_KEEP = [
    "pyproject.toml",
    "requirements.txt",
    "orchestrator/config.py",
    "trainables/data/__init__.py",
    "trainables/data/cifar10.py",
    "configs/digits.yaml",
    "search_spaces/sprout.yaml",
    "benchmarks/step_cost.py",
]


# ---------------------------------------------------------------- helpers


def all_yaml_files() -> list[Path]:
    return sorted(CLUSTER.rglob("*.yaml"))


def manifest_files() -> list[Path]:
    return [p for p in all_yaml_files() if p not in DATA_FILES]


def gpu_req() -> dict:
    return load_one(CLUSTER / "gpu-requirements.yaml")


def firewall() -> dict:
    return load_one(CLUSTER / "firewall.yaml")


def requirements_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==(\S+)", line.strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def load_docs(path: Path) -> list[Any]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def load_one(path: Path) -> dict:
    docs = load_docs(path)
    assert len(docs) == 1, f"{path} should hold one YAML document"
    return docs[0]


def kube_objects() -> list[dict]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in load_docs(p)]


def kube(kind: str) -> list[dict]:
    return [o for o in kube_objects() if o.get("kind") == kind]


def kube_job(name: str) -> dict:
    (job,) = [j for j in kube("Job") if j["metadata"]["name"] == name]
    return job


def runtime_env() -> dict:
    return load_one(CLUSTER / "runtime_env.yaml")


def rayjob() -> dict:
    (job,) = kube("RayJob")
    return job


def raycluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec: the standalone RayCluster and the RayJob's embedded one."""
    specs = [(f"RayCluster/{c['metadata']['name']}", c["spec"]) for c in kube("RayCluster")]
    specs += [(f"RayJob/{j['metadata']['name']}", j["spec"]["rayClusterSpec"]) for j in kube("RayJob")]
    assert specs, "no RayCluster or RayJob manifest under cluster/kuberay"
    return specs


def ray_pod_templates() -> list[tuple[str, str, dict]]:
    """(where, group kind, pod template) for every head and worker group."""
    out = []
    for where, spec in raycluster_specs():
        out.append((where, "head", spec["headGroupSpec"]["template"]))
        for g in spec.get("workerGroupSpecs", []):
            out.append((f"{where}/{g['groupName']}", "worker", g["template"]))
    return out


def all_pod_templates() -> list[tuple[str, dict]]:
    """(where, pod template) for every pod the manifests create: Ray groups, the RayJob
    submitter, Deployments, StatefulSets and Jobs."""
    out = [(w, t) for w, _, t in ray_pod_templates()]
    out += [(f"RayJob/{j['metadata']['name']}/submitter", j["spec"]["submitterPodTemplate"]) for j in kube("RayJob")]
    for kind in ("Deployment", "StatefulSet", "Job"):
        out += [(f"{kind}/{o['metadata']['name']}", o["spec"]["template"]) for o in kube(kind)]
    return out


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def walk(node: Any, path: str = ""):
    """Yield (path, mapping) for every mapping in a YAML tree."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


def excluded(patterns: list[str], relpath: str, tmp_path: Path) -> bool:
    """Whether Ray's working_dir packer drops `relpath` (its own exclude matcher)."""
    from ray._private.runtime_env.packaging import _get_excludes

    root = tmp_path / "wd"
    root.mkdir(exist_ok=True)
    match = _get_excludes(root, patterns)
    parts = Path(relpath).parts
    # Ray checks every directory on the way down; a file is dropped if any prefix matches.
    return any(match(root.joinpath(*parts[: i + 1])) for i in range(len(parts)))


def pack(path: Path, out: Path) -> zipfile.ZipFile:
    """Zip `path` exactly as `ray job submit --working-dir` does, with our excludes only."""
    from ray._private.runtime_env.packaging import create_package

    create_package(str(path), out, include_gitignore=False, excludes=runtime_env()["excludes"])
    return zipfile.ZipFile(out)


def ray_start(commands: list[str], head: bool) -> str:
    starts = [c for c in commands if "ray start" in c]
    assert len(starts) == 1, f"expected one `ray start` command, got {starts}"
    assert ("--head" in starts[0]) == head
    return starts[0]


def flag(cmd: str, name: str) -> str | None:
    m = re.search(rf"--{name}[= ](\S+)", cmd)
    return m.group(1) if m else None


# ---------------------------------------------------------------- every file


def test_cluster_dir_has_the_expected_files():
    for rel in [
        "runtime_env.yaml",
        "aws.yaml",
        "gcp.yaml",
        "Dockerfile",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/mlflow.yaml",
        "kuberay/shared-storage.yaml",
        "kuberay/network-policy.yaml",
        "gpu-requirements.yaml",
        "firewall.yaml",
        "submit.sh",
        "mlflow.Dockerfile",
        "aws-iam/head-policy.json",
        "aws-iam/worker-policy.json",
        "aws-iam/ec2-trust.json",
    ]:
        assert (CLUSTER / rel).is_file(), f"cluster/{rel} is missing"


@pytest.mark.parametrize("path", all_yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_parses_safely_and_opens_with_its_launch_command(path: Path):
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs)
    first = path.read_text().splitlines()[0]
    opening = "# Data, not applied" if path in DATA_FILES else "# Launch: "
    assert first.startswith(opening), f"{path} must open with a '{opening}...' comment"


def test_no_secret_values_anywhere():
    """No token/password/key is written in a manifest: env vars named like one come from a
    Secret (valueFrom), and no Secret object with data is committed."""
    for path in all_yaml_files():
        for doc in load_docs(path):
            assert not (doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData"))), (
                f"{path}: a Secret with data is committed; create it with kubectl instead"
            )
            for where, node in walk(doc):
                if "name" in node and ("value" in node or "valueFrom" in node) and isinstance(node["name"], str):
                    if SECRET_NAME.search(node["name"]):
                        assert "value" not in node, (
                            f"{path}{where}: {node['name']} is inline; use valueFrom.secretKeyRef"
                        )
                        assert "secretKeyRef" in node["valueFrom"], (
                            f"{path}{where}: {node['name']} must come from a Secret"
                        )
    # runtime_env env_vars are visible in the dashboard and job metadata.
    envs = [runtime_env().get("env_vars", {}), yaml.safe_load(rayjob()["spec"]["runtimeEnvYAML"]).get("env_vars", {})]
    for env in envs:
        for name in env:
            assert not SECRET_NAME.search(name), f"runtime_env env_vars must not carry secrets ({name})"
    for path in LAUNCHERS:
        text = path.read_text()
        assert "RAY_AUTH_TOKEN=" not in text, f"{path}: the token is copied from ~/.ray/auth_token, never written"
        assert not re.search(r"AKIA[0-9A-Z]{16}|BEGIN [A-Z ]*PRIVATE KEY", text)


def test_token_auth_is_never_disabled():
    for path in [*all_yaml_files(), CLUSTER / "Dockerfile", CLUSTER / "submit.sh"]:
        assert not re.search(r"RAY_AUTH_MODE\W+disabled", path.read_text()), f"{path} disables Ray token auth"


# ---------------------------------------------------------------- runtime_env and the upload


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    env = runtime_env()
    assert set(env) <= {"excludes", "env_vars"}, "working_dir comes from `--working-dir .`; nothing else belongs here"
    RuntimeEnv(**env)  # Ray's own validation (types, known fields)
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "env_vars values must be strings"
    assert env["env_vars"]["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"


@pytest.mark.parametrize("relpath", MUST_EXCLUDE)
def test_runtime_env_excludes(relpath: str, tmp_path: Path):
    assert excluded(runtime_env()["excludes"], relpath, tmp_path), f"{relpath} would be uploaded"


@pytest.mark.parametrize("relpath", MUST_KEEP)
def test_runtime_env_keeps_code_and_configs(relpath: str, tmp_path: Path):
    # trainables/data/ is the dataset package: an unanchored "data" pattern would drop it.
    assert not excluded(runtime_env()["excludes"], relpath, tmp_path), f"{relpath} would not be uploaded"


def test_repository_upload_is_far_below_rays_limit(tmp_path: Path):
    """Pack this checkout (its .venv and .git included, .gitignore ignored) the way Ray does."""
    zf = pack(REPO, tmp_path / "wd.zip")
    size = (tmp_path / "wd.zip").stat().st_size
    names = zf.namelist()
    assert size < 10 * MIB, f"working_dir zip is {size / MIB:.1f} MiB; Ray's limit is 100 MiB"
    for top in (".git/", ".venv/", "ray_results/", "mlruns/", "mlartifacts/", "data/"):
        assert not any(n.startswith(top) for n in names), f"{top} was packed"
    assert not any("__pycache__/" in n or n.endswith(".pt") for n in names)
    assert "pyproject.toml" in names
    assert "trainables/data/__init__.py" in names
    assert any(n.startswith("orchestrator/") for n in names)


def test_excluded_bulk_never_reaches_the_zip(tmp_path: Path):
    """A working dir whose .venv, .git, data and results hold 20 MiB of incompressible bytes
    still packs to a few KiB of code."""
    import os

    wd = tmp_path / "repo"
    for rel in MUST_EXCLUDE:
        f = wd / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(os.urandom(16 * 1024))
    (wd / ".venv/lib/big.so").write_bytes(os.urandom(20 * MIB))
    for rel in MUST_KEEP:
        f = wd / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"# {rel}\n")
    zf = pack(wd, tmp_path / "wd.zip")
    assert (tmp_path / "wd.zip").stat().st_size < 64 * 1024
    files = {n for n in zf.namelist() if not n.endswith("/")}
    assert files == set(MUST_KEEP)


# ---------------------------------------------------------------- cloud launcher configs


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_config_passes_rays_schema(path: Path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(load_one(path))))


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_image_pins_installed_ray(path: Path):
    image = load_one(path)["docker"]["image"]
    repo_name, tag = image.rsplit(":", 1)
    assert repo_name in {"rayproject/ray", "rayproject/ray-ml"}
    assert tag.startswith(f"{RAY_VERSION}-") and "gpu" in tag, f"{image} should be Ray {RAY_VERSION}, GPU build"


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_has_cpu_head_and_autoscaling_gpu_workers(path: Path):
    cfg = load_one(path)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU"), "the head runs no training work"
    assert "--num-cpus=0" in ray_start(cfg["head_start_ray_commands"], head=True)
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    assert workers, "no worker node types"
    for name, t in workers.items():
        assert t["resources"].get("GPU", 0) >= 1, f"{name} is not a GPU node type"
        assert 0 <= t["min_workers"] <= t["max_workers"], f"{name}: bad autoscaling bounds"
        node = t["node_config"]
        if cfg["provider"]["type"] == "aws":
            family = node["InstanceType"].split(".")[0]
            assert family in {"g4dn", "g5", "g6", "g6e", "p3", "p4d", "p4de", "p5", "p5e", "p5en"}, name
        else:
            machine = node["machineType"]
            assert node.get("guestAccelerators") or machine.split("-")[0] in {"a2", "a3", "a4", "g2"}, name
            # GCE's Scheduling is an object; a list is ignored or refused by the API.
            assert isinstance(node["scheduling"], dict), f"{name}: scheduling must be a mapping"
            assert node["scheduling"]["onHostMaintenance"] == "TERMINATE", f"{name}: GPU VMs cannot live-migrate"
    assert cfg["max_workers"] >= sum(t["min_workers"] for t in workers.values())
    assert cfg["max_workers"] >= max(t["max_workers"] for t in workers.values())


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_installs_this_package(path: Path):
    cfg = load_one(path)
    mounts = cfg["file_mounts"]
    assert mounts.get("~/sprout") == ".", "the repository is synced to ~/sprout"
    setup = " && ".join(cfg["setup_commands"])
    assert "pip install" in setup and "requirements.txt" in setup
    assert re.search(r"pip install .*(-e ~/sprout|sprout-orchestrator)", setup), "the `sprout` command is installed"
    excludes = {p.lstrip("/") for p in runtime_env()["excludes"]}
    assert excludes <= {p.lstrip("/") for p in cfg["rsync_exclude"]}, "file_mounts sync must skip what the upload skips"
    assert "/data" in cfg["rsync_exclude"], "anchored, so trainables/data/ is synced"


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_keeps_dashboard_private_and_token_auth_on(path: Path):
    cfg = load_one(path)
    head = ray_start(cfg["head_start_ray_commands"], head=True)
    worker = ray_start(cfg["worker_start_ray_commands"], head=False)
    assert flag(head, "dashboard-host") == "127.0.0.1", "the dashboard/job API binds the head's loopback only"
    for cmd in (head, worker):
        assert "RAY_AUTH_MODE=token" in cmd
        assert flag(cmd, "ray-client-server-port") is None
        assert "MLFLOW_TRACKING_URI=" in cmd, "every node's Ray processes reach the tracking server"
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert "--dashboard-host=0.0.0.0" not in cmd and "--dashboard-host 0.0.0.0" not in cmd
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", "one shared token, copied not written"
    for opt in cfg["docker"]["run_options"]:
        assert not re.search(r"(-p|--publish)\b", opt), f"docker publishes a port: {opt}"


MY_IP = re.compile(r"^\$\(curl -s https://checkip\.amazonaws\.com\)/32$")
WORLD = {"0.0.0.0/0", "::/0"}


def shell_commands(text: str, prefix: str) -> list[list[str]]:
    """Every command starting with `prefix` in a file's text (YAML comments or a Markdown
    block), continuation lines joined, as shlex tokens."""
    lines = [re.sub(r"^\s*#?\s*", "", line) for line in text.splitlines()]
    out, i = [], 0
    while i < len(lines):
        if lines[i].startswith(prefix):
            cmd = lines[i]
            while cmd.endswith("\\"):
                i += 1
                cmd = cmd[:-1] + " " + lines[i]
            out.append(shlex.split(cmd))
        i += 1
    return out


def options(argv: list[str]) -> dict[str, str]:
    """--flag value and --flag=value pairs of one command."""
    opts, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--"):
            if "=" in a:
                k, v = a[2:].split("=", 1)
            else:
                k, v = a[2:], argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
                i += 1 if v else 0
            opts[k] = v
        i += 1
    return opts


def created(argv: list[str]) -> str:
    """The name a `gcloud ... create NAME` command creates."""
    return argv[argv.index("create") + 1]


def source(value: str) -> str:
    return "my-ip/32" if MY_IP.match(value) else value


def aws_rules(text: str) -> tuple[str, list[dict]]:
    """(group name, ingress rules) as the AWS CLI commands in `text` create them."""
    (create,) = shell_commands(text, "SG=$(aws ec2 create-security-group")
    group = options(create)["group-name"]
    rules = []
    for argv in shell_commands(text, "aws ec2 authorize-security-group-ingress"):
        o = options(argv)
        assert o["group-id"] == "$SG", f"a rule for another group: {argv}"
        protocol = "all" if o["protocol"] == "-1" else o["protocol"]
        if "source-group" in o:
            assert o["source-group"] == "$SG", f"traffic from a group other than the cluster's own: {argv}"
            src = "self"
        else:
            src = source(o["cidr"])
        rules.append({"protocol": protocol, "ports": o.get("port", "all"), "source": src})
    return group, rules


def gcp_rules(text: str) -> tuple[dict, list[dict]]:
    """(network and subnet, ingress rules) as the gcloud commands in `text` create them."""
    (net,) = shell_commands(text, "gcloud compute networks create")
    (sub,) = shell_commands(text, "gcloud compute networks subnets create")
    so = options(sub)
    assert so["network"] == created(net)
    network = {"network": created(net), "subnet": {"name": created(sub), "region": so["region"], "range": so["range"]}}
    rules = []
    for argv in shell_commands(text, "gcloud compute firewall-rules create"):
        o = options(argv)
        assert o["network"] == network["network"] and o.get("direction", "INGRESS") == "INGRESS", argv
        network.setdefault("target_tags", set()).add(o["target-tags"])
        rules.append({"name": created(argv), "allow": o["allow"].split(","), "source": source(o["source-ranges"])})
    return network, rules


def check_rule_is_private_or_ssh(rule: dict, internal: set[str]):
    """Only SSH may come from the world or an address; everything else from the cluster itself."""
    src = rule["source"]
    if src in internal:
        return
    assert src in WORLD or src == "my-ip/32" or src.endswith("/32"), f"{rule}: traffic from {src}"
    ports = rule.get("allow") or [f"{rule['protocol']}:{rule['ports']}"]
    assert ports == ["tcp:22"], f"{rule} opens more than SSH to {src}"


def test_firewall_data_opens_nothing_but_ssh_to_the_world():
    fw = firewall()
    for rule in fw["aws"]["ingress"]:
        check_rule_is_private_or_ssh(rule, internal={"self"})
    for rule in fw["gcp"]["ingress"]:
        check_rule_is_private_or_ssh(rule, internal={fw["gcp"]["subnet"]["range"]})
    assert any(r["source"] == "self" for r in fw["aws"]["ingress"]), "the nodes must reach each other"


@pytest.mark.parametrize("where", [CLUSTER / "aws.yaml", DOCS], ids=lambda p: p.name)
def test_aws_security_group_commands_create_exactly_the_firewall_data(where: Path):
    group, rules = aws_rules(where.read_text())
    fw = firewall()["aws"]
    assert group == fw["security_group"]
    assert rules == fw["ingress"], f"{where}: the commands differ from cluster/firewall.yaml"
    for rule in rules:
        check_rule_is_private_or_ssh(rule, internal={"self"})


@pytest.mark.parametrize("where", [CLUSTER / "gcp.yaml", DOCS], ids=lambda p: p.name)
def test_gcp_firewall_commands_create_exactly_the_firewall_data(where: Path):
    network, rules = gcp_rules(where.read_text())
    fw = firewall()["gcp"]
    assert network["network"] == fw["network"] and network["subnet"] == fw["subnet"]
    assert network["target_tags"] == {fw["target_tag"]}, "every rule targets the cluster's nodes only"
    assert rules == fw["ingress"], f"{where}: the commands differ from cluster/firewall.yaml"
    for rule in rules:
        check_rule_is_private_or_ssh(rule, internal={fw["subnet"]["range"]})


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_nodes_sit_behind_the_firewall(path: Path):
    cfg = load_one(path)
    fw = firewall()
    if cfg["provider"]["type"] == "aws":
        # A named, pre-created group: Ray uses it as it is (its own default opens SSH to the world).
        assert cfg["provider"]["security_group"] == {"GroupName": fw["aws"]["security_group"]}
    else:
        sub = fw["gcp"]["subnet"]
        assert cfg["provider"]["region"] == sub["region"]
        for name, t in cfg["available_node_types"].items():
            node = t["node_config"]
            assert node["tags"]["items"] == [fw["gcp"]["target_tag"]], f"{name}: not covered by the firewall rules"
            nets = [n["subnetwork"] for n in node["networkInterfaces"]]
            assert nets == [f"regions/{sub['region']}/subnetworks/{sub['name']}"], f"{name}: another network"
    # Nor does the config itself open anything (Ray applies IpPermissions it finds here).
    for where, node in walk(cfg):
        ranges = [r.get("CidrIp") for r in node.get("IpRanges", [])] + list(node.get("sourceRanges", []))
        ranges += [r.get("CidrIpv6") for r in node.get("Ipv6Ranges", [])]
        if not ranges:
            continue
        lo, hi = node.get("FromPort", -1), node.get("ToPort", -1)
        ports = set(range(lo, hi + 1)) if lo >= 0 else set(range(0, 65536))
        assert not (ports & PRIVATE_PORTS), f"{path}{where} opens {sorted(ports & PRIVATE_PORTS)}"
        if WORLD & set(ranges):
            assert ports == {22}, f"{path}{where} opens more than SSH to the internet"


# ---------------------------------------------------------------- KubeRay


def test_kuberay_ray_version_matches_installed_ray():
    for where, spec in raycluster_specs():
        assert str(spec["rayVersion"]) == RAY_VERSION, f"{where}: rayVersion {spec['rayVersion']} != ray {RAY_VERSION}"


def test_kuberay_images_carry_the_ray_version():
    images = [(w, c["image"]) for w, _, t in ray_pod_templates() for c in t["spec"]["containers"]]
    images += [("RayJob submitter", c["image"]) for c in rayjob()["spec"]["submitterPodTemplate"]["spec"]["containers"]]
    images += [
        (f"Job/{j['metadata']['name']}", c["image"])
        for j in kube("Job")
        for c in j["spec"]["template"]["spec"]["containers"]
        if not c["image"].startswith("sprout-mlflow:")  # the MLflow image carries MLflow's version
    ]
    assert images
    for where, image in images:
        assert RAY_VERSION in image.rsplit(":", 1)[1], f"{where}: image {image} does not carry Ray {RAY_VERSION}"
    base = re.search(r"^FROM\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert base.startswith(f"rayproject/ray:{RAY_VERSION}-"), f"cluster/Dockerfile builds on {base}"


def test_rayjob_runs_the_laptop_sprout_command():
    spec = rayjob()["spec"]
    entry = spec["entrypoint"]
    assert entry.startswith("sprout "), "the same console script a laptop runs"
    argv = shlex.split(entry)
    assert argv[1] == "train"
    config = argv[2]
    assert config.startswith("configs/") and config.endswith(".yaml")
    assert (REPO / config).is_file(), f"{config} (named by the RayJob entrypoint) does not exist"
    assert "--name" in argv, "a fixed run name, so a retried RayJob resumes"
    sets = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")
    assert sets["storage.path"].startswith("/mnt/shared/"), "checkpoints go to the shared volume"
    data = yaml.safe_load((REPO / config).read_text()).get("data", {})
    root = sets.get("data.root", data.get("root"))
    if root is not None:  # data/ is never uploaded: the job's dataset is on the shared volume
        assert root.startswith("/mnt/shared/") or "://" in root, f"data.root {root} is not on shared storage"
        if data.get("name") == "cifar10":
            fetch = " ".join(kube_job("cifar10-data")["spec"]["template"]["spec"]["containers"][0]["command"])
            assert f'"{root}"' in fetch, "cluster/kuberay/cifar10-data.yaml fills another directory"
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True


def test_rayjob_runtime_env_matches_runtime_env_yaml():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(rayjob()["spec"]["runtimeEnvYAML"])
    base = runtime_env()
    assert env["excludes"] == base["excludes"]
    assert base["env_vars"].items() <= env["env_vars"].items()
    RuntimeEnv(**{k: v for k, v in env.items() if k != "working_dir"})  # working_dir lives in the image
    workdir = re.search(r"^WORKDIR\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert env["working_dir"] == workdir, "the RayJob uploads the image's copy of the repository"
    config_dir = shlex.split(rayjob()["spec"]["entrypoint"])[2].split("/")[0]
    assert re.search(rf"^COPY\s.*\b{config_dir}\s", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE)


def test_kuberay_workers_request_gpus_and_head_does_not():
    for where, kind, template in ray_pod_templates():
        (container,) = [c for c in template["spec"]["containers"]]
        limits = container["resources"]["limits"]
        if kind == "worker":
            assert int(limits["nvidia.com/gpu"]) >= 1, f"{where}: worker group without GPUs"
        else:
            assert "nvidia.com/gpu" not in limits, f"{where}: the head should be CPU-only"
    for where, spec in raycluster_specs():
        assert str(spec["headGroupSpec"]["rayStartParams"]["num-cpus"]) == "0", f"{where}: head takes training work"
        for g in spec["workerGroupSpecs"]:
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}/{g['groupName']}"
        assert spec.get("enableInTreeAutoscaling") is True


def test_kuberay_shared_storage_on_every_ray_pod():
    (pvc,) = kube("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    claim = pvc["metadata"]["name"]
    for where, _, template in ray_pod_templates():
        vols = {v["name"]: v for v in template["spec"].get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert "/mnt/shared" in mounts, f"{where}: /mnt/shared not mounted"
        assert vols[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"] == claim, where
    # No database on the shared (NFS) volume: MLflow keeps its state in PostgreSQL.
    for kind in ("Deployment", "StatefulSet"):
        for obj in kube(kind):
            vols = obj["spec"]["template"]["spec"].get("volumes", [])
            claims = [v["persistentVolumeClaim"]["claimName"] for v in vols if "persistentVolumeClaim" in v]
            assert claim not in claims, f"{kind}/{obj['metadata']['name']} keeps state on the shared volume"


def mlflow_deployment() -> tuple[dict, dict]:
    (deploy,) = [d for d in kube("Deployment") if d["metadata"]["name"] == "mlflow"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return deploy, container


def test_kuberay_pods_reach_the_in_cluster_mlflow_service():
    (svc,) = [s for s in kube("Service") if s["metadata"]["name"] == "mlflow"]
    ns = svc["metadata"]["namespace"]
    assert [p["port"] for p in svc["spec"]["ports"]] == [5000]
    uri = f"http://mlflow.{ns}.svc:5000"
    for where, _, template in ray_pod_templates():
        env = env_of(template["spec"]["containers"][0])
        assert env["MLFLOW_TRACKING_URI"]["value"] == uri, where
    _, container = mlflow_deployment()
    args = " ".join(container["args"])
    assert "mlflow server" in args and "--port 5000" in args
    assert re.search(rf"--allowed-hosts \S*mlflow\.{re.escape(ns)}\.svc", args), "in-cluster Host header allowed"
    assert "--allowed-hosts *" not in args and "--allowed-hosts '*'" not in args


def test_mlflow_image_is_the_pinned_mlflow_with_its_drivers():
    """cluster/mlflow.Dockerfile installs requirements.txt's MLflow (with the auth extra),
    psycopg2 and boto3; every MLflow pod runs that image's tag."""
    pins = requirements_pins()
    text = (CLUSTER / "mlflow.Dockerfile").read_text()
    installed = dict(re.findall(r"\b([a-z0-9-]+)(?:\[[a-z,]+\])?==([\w.]+)", text))
    for pkg in ("mlflow", "psycopg2-binary", "boto3"):
        assert installed.get(pkg) == pins[pkg], f"mlflow.Dockerfile: {pkg} {installed.get(pkg)} != {pins[pkg]}"
    assert re.search(r"mlflow\[auth\]==", text), "the basic-auth app needs mlflow[auth] (Flask-WTF)"
    assert version("mlflow") == pins["mlflow"]
    images = [
        c["image"]
        for w, t in all_pod_templates()
        for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]
        if "mlflow" in c["image"] and "postgres" not in c["image"]
    ]
    assert images and all(i.endswith(f":{pins['mlflow']}") for i in images), images


def test_mlflow_runs_on_postgresql_with_proxied_artifacts_and_basic_auth():
    deploy, container = mlflow_deployment()
    spec = deploy["spec"]["template"]["spec"]
    env = env_of(container)
    args = " ".join(container["args"])
    assert "--app-name basic-auth" in args, "authentication on"
    assert "--serve-artifacts" in args and '--artifacts-destination "$ARTIFACTS_DESTINATION"' in args
    assert env["ARTIFACTS_DESTINATION"]["value"].startswith("s3://"), "artifacts go to the bucket, proxied"
    assert '--backend-store-uri "$BACKEND_STORE_URI"' in args
    # as the launchers' head command (run by test_mlflow_server.py): MLflow 3's job executor off
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    backend = env["BACKEND_STORE_URI"]["value"]
    # The backend and the auth store: PostgreSQL, with no password in the URI (PGPASSWORD).
    config = configparser.ConfigParser()
    (cm,) = [c for c in kube("ConfigMap") if c["metadata"]["name"] == "mlflow-auth"]
    config.read_string(cm["data"]["basic_auth.ini"])
    auth_db = config["mlflow"]["database_uri"]
    (pg_svc,) = [s for s in kube("Service") if s["metadata"]["name"] == "mlflow-postgres"]
    host = f"mlflow-postgres.{pg_svc['metadata']['namespace']}.svc:{pg_svc['spec']['ports'][0]['port']}"
    for uri in (backend, auth_db):
        assert re.fullmatch(rf"postgresql\+psycopg2://mlflow@{re.escape(host)}/\w+", uri), f"{uri}: PostgreSQL, no password"
    assert backend.rsplit("/", 1)[1] != auth_db.rsplit("/", 1)[1], "two databases: both stores use alembic_version"
    assert "admin_password" not in config["mlflow"], "the admin password comes from a Secret"
    # MLflow 3's basic-auth app refuses to start without a CSRF key shared by its workers
    for name in ("PGPASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].startswith(
        next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "auth-config")
    )
    # The schemas are migrated once, before the server's workers start.
    (init,) = spec["initContainers"]
    assert env_of(init) == env and "migrate(" in init["args"][0] and "SqlAlchemyStore(" in init["args"][0]
    # PostgreSQL: its own block volume, the password from the same Secret as the server's.
    (pg,) = kube("StatefulSet")
    (pgc,) = pg["spec"]["template"]["spec"]["containers"]
    pg_env = env_of(pgc)
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    assert pg_env["POSTGRES_USER"]["value"] == "mlflow"
    assert pg["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    (init_sql,) = [c for c in kube("ConfigMap") if c["metadata"]["name"] == "mlflow-postgres-init"]
    assert f"CREATE DATABASE {auth_db.rsplit('/', 1)[1]} OWNER mlflow" in " ".join(init_sql["data"].values())
    for obj in kube_objects():
        assert "sqlite" not in json.dumps(obj), f"{obj['kind']}/{obj['metadata']['name']} still uses SQLite"


def test_ray_pods_log_in_to_mlflow_from_a_secret():
    (job,) = [j for j in kube("Job") if j["metadata"]["name"] == "mlflow-client-user"]
    job_env = env_of(job["spec"]["template"]["spec"]["containers"][0])
    user_ref = job_env["SPROUT_MLFLOW_USERNAME"]["valueFrom"]["secretKeyRef"]
    pass_ref = job_env["SPROUT_MLFLOW_PASSWORD"]["valueFrom"]["secretKeyRef"]
    for where, _, template in ray_pod_templates():
        env = env_of(template["spec"]["containers"][0])
        assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"] == user_ref, where
        assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == pass_ref, where
    for env in (runtime_env().get("env_vars", {}), yaml.safe_load(rayjob()["spec"]["runtimeEnvYAML"])["env_vars"]):
        assert not {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} & set(env), "secrets in the runtime env"


def test_kuberay_token_auth_from_a_secret():
    secrets = set()
    for where, spec in raycluster_specs():
        auth = spec["authOptions"]
        assert auth["mode"] == "token", where
        secrets.add(auth["secretName"])
    assert len(secrets) == 1, "one token for the cluster, the operator and the clients"
    (secret,) = secrets
    containers = [(w, c) for w, _, t in ray_pod_templates() for c in t["spec"]["containers"]]
    containers += [("submitter", c) for c in rayjob()["spec"]["submitterPodTemplate"]["spec"]["containers"]]
    for where, c in containers:
        env = env_of(c)
        assert env["RAY_AUTH_MODE"]["value"] == "token", where
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (secret, "auth_token"), where


def test_kuberay_services_stay_inside_the_cluster():
    for obj in kube_objects():
        assert obj.get("kind") not in {"Ingress", "Route", "Gateway", "HTTPRoute"}, f"{obj['kind']} exposes a port"
        if obj.get("kind") == "Service":
            assert obj["spec"].get("type", "ClusterIP") == "ClusterIP", f"Service {obj['metadata']['name']}"
    for where, spec in raycluster_specs():
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", where
    for where, node in walk(kube_objects()):
        assert not node.get("hostNetwork"), f"{where}: hostNetwork exposes every port on the node"
        assert "hostPort" not in node, f"{where}: hostPort exposes a port on the node"
        assert "loadBalancerIP" not in node and "externalIPs" not in node, where


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against pod labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        ok = {
            "In": present and value in e.get("values", []),
            "NotIn": not present or value not in e["values"],
            "Exists": present,
            "DoesNotExist": not present,
        }[e["operator"]]
        if not ok:
            return False
    return True


def test_kuberay_network_policy_admits_only_the_namespace_and_operator():
    policies = kube("NetworkPolicy")
    assert all("Ingress" in p["spec"]["policyTypes"] for p in policies)
    for policy in policies:
        for rule in policy["spec"]["ingress"]:
            for peer in rule["from"]:
                assert "ipBlock" not in peer, "no CIDR-based access"
                if "namespaceSelector" in peer:  # other namespaces: the operator, dashboard port only
                    assert peer["podSelector"]["matchLabels"], "other namespaces only for a selected operator pod"
                    assert [p["port"] for p in rule["ports"]] == [8265]
    labels_of = {where: t["metadata"]["labels"] for where, t in all_pod_templates()}
    for where, labels in labels_of.items():
        assert any(selects(p["spec"]["podSelector"], labels) for p in policies), f"{where}: no NetworkPolicy"
    # PostgreSQL: only the MLflow server's pods, only on 5432, and no other policy selects it.
    (pg_where,) = [w for w in labels_of if w.startswith("StatefulSet/")]
    covering = [p for p in policies if selects(p["spec"]["podSelector"], labels_of[pg_where])]
    assert len(covering) == 1, [p["metadata"]["name"] for p in covering]
    (rule,) = covering[0]["spec"]["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"} and [p["port"] for p in rule["ports"]] == [5432]
    admitted = [w for w, labels in labels_of.items() if selects(peer["podSelector"], labels)]
    assert admitted == ["Deployment/mlflow"], admitted


def test_kuberay_objects_share_one_namespace():
    namespaces = {o["metadata"].get("namespace") for o in kube_objects()}
    assert len(namespaces) == 1 and None not in namespaces, namespaces


# ---------------------------------------------------------------- Kubernetes schemas


def test_kubernetes_core_objects_pass_the_kubernetes_schema_strictly():
    """Every non-Ray object (Deployments, StatefulSets, Services, Jobs, PVCs, ConfigMaps,
    ServiceAccounts, NetworkPolicies) against the Kubernetes API's own schema, unknown
    fields refused (kubectl apply --validate=strict)."""
    import kubernetes_validate

    core = [o for o in kube_objects() if not o["apiVersion"].startswith("ray.io/")]
    kinds = {o["kind"] for o in core}
    assert {"Deployment", "StatefulSet", "Service", "Job", "PersistentVolumeClaim", "NetworkPolicy"} <= kinds
    for obj in core:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_ray_pod_templates_pass_the_kubernetes_pod_template_schema_strictly():
    """RayCluster and RayJob embed core PodTemplateSpecs (the bulk of KubeRay's CRD schema):
    each one, wrapped in a core PodTemplate, passes the Kubernetes schema strictly."""
    import kubernetes_validate

    templates = [(w, t) for w, _, t in ray_pod_templates()]
    templates += [("submitter", j["spec"]["submitterPodTemplate"]) for j in kube("RayJob")]
    for where, template in templates:
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        try:
            kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{where}: {e.message}") from None


# ---------------------------------------------------------------- node types and pod sizes


def quantity(value: Any) -> float:
    """A Kubernetes quantity (cpu '500m', memory '64Gi', a plain number) as a float."""
    v = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for unit, factor in units.items():
        if v.endswith(unit):
            return float(v[: -len(unit)]) * factor
    return float(v)


def node_type_of(template: dict) -> str:
    """The node type a pod template is pinned to: node.kubernetes.io/instance-type in its
    nodeSelector or its required node affinity (exactly one value)."""
    spec = template["spec"]
    key = "node.kubernetes.io/instance-type"
    found = []
    if key in spec.get("nodeSelector", {}):
        found.append(spec["nodeSelector"][key])
    terms = (
        spec.get("affinity", {})
        .get("nodeAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution", {})
        .get("nodeSelectorTerms", [])
    )
    for term in terms:
        for e in term.get("matchExpressions", []):
            if e["key"] == key:
                assert e["operator"] == "In" and len(e["values"]) == 1, e
                found.append(e["values"][0])
    assert len(found) == 1, f"pinned to {found}: name exactly one node type"
    return found[0]


def node_labels_required(template: dict) -> dict[str, str]:
    spec = template["spec"]
    out = dict(spec.get("nodeSelector", {}))
    terms = spec.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", {})
    for term in terms.get("nodeSelectorTerms", []):
        out.update({e["key"]: e["values"][0] for e in term.get("matchExpressions", [])})
    return out


def pod_requests(template: dict) -> dict[str, float]:
    """What the scheduler reserves: the sum over containers, or the largest init container."""
    spec = template["spec"]
    total: dict[str, float] = {}
    for c in spec["containers"]:
        for k, v in c["resources"]["requests"].items():
            total[k] = total.get(k, 0) + quantity(v)
    for c in spec.get("initContainers", []):
        for k, v in c["resources"]["requests"].items():
            total[k] = max(total.get(k, 0), quantity(v))
    return total


def gke_allocatable(cpu: float, memory_gib: float) -> tuple[float, float]:
    """GKE's documented reservation for a node of this size (CPU cores, memory GiB)."""
    cpu_reserved = 0.06 * min(cpu, 1) + 0.01 * min(max(cpu - 1, 0), 1)
    cpu_reserved += 0.005 * min(max(cpu - 2, 0), 2) + 0.0025 * max(cpu - 4, 0)
    mem = memory_gib
    mem_reserved = 0.25 * min(mem, 4) + 0.2 * min(max(mem - 4, 0), 4) + 0.1 * min(max(mem - 8, 0), 8)
    mem_reserved += 0.06 * min(max(mem - 16, 0), 112) + 0.02 * max(mem - 128, 0) + 100 / 1024
    return cpu - cpu_reserved, mem - mem_reserved


def test_documented_allocatable_is_what_gke_leaves():
    for name, t in gpu_req()["kuberay_node_types"].items():
        cpu, mem = gke_allocatable(t["capacity"]["cpu"], t["capacity"]["memory_gib"])
        alloc = t["allocatable"]
        assert quantity(alloc["cpu"]) <= cpu + 1e-9, f"{name}: allocatable cpu above GKE's {cpu:.3f}"
        assert quantity(alloc["memory"]) <= mem * 2**30, f"{name}: allocatable memory above GKE's {mem:.2f} GiB"
        assert quantity(alloc["cpu"]) >= cpu - 0.1 and quantity(alloc["memory"]) >= (mem - 1) * 2**30, name
        assert int(alloc.get("nvidia.com/gpu", 0)) == t["capacity"].get("gpus", 0), name


def test_every_pod_fits_the_node_type_it_is_pinned_to():
    req = gpu_req()
    types = req["kuberay_node_types"]
    reserve = {k: quantity(v) for k, v in req["daemonset_reserve"].items()}
    templates = all_pod_templates()
    assert len(templates) >= 8
    for where, template in templates:
        name = node_type_of(template)
        assert name in types, f"{where}: node type {name} is not documented in cluster/gpu-requirements.yaml"
        node = types[name]
        alloc = {k: quantity(v) for k, v in node["allocatable"].items()}
        need = pod_requests(template)
        for res, amount in need.items():
            room = alloc.get(res, 0) - reserve.get(res, 0)
            assert amount <= room, f"{where}: requests {res}={amount:g}, {name} leaves {room:g}"
        gpus = need.get("nvidia.com/gpu", 0)
        if gpus:
            labels = node_labels_required(template)
            assert labels.get("cloud.google.com/gke-accelerator") == node["gke_accelerator"], where
        else:
            assert "gke_accelerator" not in node, f"{where}: a CPU pod on a GPU node"
    # Ray pods are Guaranteed (limits == requests): what the autoscaler counts is what they get.
    for where, _, template in ray_pod_templates():
        for c in template["spec"]["containers"]:
            r = c["resources"]
            assert {k: quantity(v) for k, v in r["limits"].items()} == {
                k: quantity(v) for k, v in r["requests"].items()
            }, f"{where}: limits differ from requests"


def test_kuberay_has_one_and_eight_gpu_groups_per_accelerator():
    """A 1-GPU group beside whole-node 8-GPU groups (one pod per node), for A100 and H100,
    each advertising Ray's accelerator_type:<X> as the KubeRay autoscaler reads it."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec

    types = gpu_req()["kuberay_node_types"]
    for where, spec in raycluster_specs():
        seen = set()
        for g in spec["workerGroupSpecs"]:
            node = types[node_type_of(g["template"])]
            res = _get_ray_resources_from_group_spec(g, is_head=False)
            assert res[f"accelerator_type:{node['accelerator']}"] == 1, f"{where}/{g['groupName']}: {res}"
            assert [k for k in res if k.startswith("accelerator_type:")] == [f"accelerator_type:{node['accelerator']}"]
            assert res["GPU"] in (1, node["capacity"]["gpus"]), f"{where}/{g['groupName']}: one GPU or the whole node"
            seen.add((node["accelerator"], res["GPU"]))
        assert {("A100", 1), ("A100", 8), ("H100", 8)} <= seen, f"{where}: {sorted(seen)}"
        head = _get_ray_resources_from_group_spec(spec["headGroupSpec"], is_head=True)
        assert head["CPU"] == 0 and not head.get("GPU"), f"{where}: the head takes no training work"
        assert "gke_accelerator" not in types[node_type_of(spec["headGroupSpec"]["template"])], "head on a CPU node"
    groups = [sorted(g["groupName"] for g in spec["workerGroupSpecs"]) for _, spec in raycluster_specs()]
    assert all(g == groups[0] for g in groups), "RayCluster and RayJob offer the same groups"


# Names NVIDIA's driver reports for one GPU of each type (nvidia-smi --query-gpu=name).
NVML_NAMES = {"T4": "Tesla T4", "A10G": "NVIDIA A10G", "A100": "NVIDIA A100-SXM4-40GB", "H100": "NVIDIA H100 80GB HBM3"}


def test_declared_accelerator_types_are_the_ones_ray_detects():
    """Ray sets accelerator_type:<X> on a GPU node from the driver's GPU name; the names the
    files declare for the autoscaler must be the same X."""
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    req = gpu_req()
    declared = {t["accelerator"] for cloud in req["launcher_node_types"].values() for t in cloud.values() if t["gpus"]}
    declared |= {t["accelerator"] for t in req["kuberay_node_types"].values() if "accelerator" in t}
    for acc in declared:
        assert NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(NVML_NAMES[acc]) == acc


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_node_types_are_the_documented_ones(path: Path):
    cfg = load_one(path)
    cloud = cfg["provider"]["type"]
    documented = gpu_req()["launcher_node_types"][cloud]
    types = cfg["available_node_types"]
    assert set(types) == set(documented)
    for name, t in types.items():
        doc = documented[name]
        node = t["node_config"]
        assert node.get("InstanceType", node.get("machineType")) == doc["instance"], name
        res = t["resources"]
        assert res.get("GPU", 0) == doc["gpus"], name
        accel = {k: v for k, v in res.items() if k.startswith("accelerator_type:")}
        if doc["gpus"]:
            assert res["CPU"] <= doc["vcpus"], f"{name}: more CPUs than the instance has"
            # The autoscaler only knows what `resources` declares: the type must say which GPU.
            assert accel == {f"accelerator_type:{doc['accelerator']}": 1}, f"{name}: {accel}"
        else:
            assert not accel and res["CPU"] == 0, name


# ---------------------------------------------------------------- GPU driver and torch


def test_gpu_requirement_matches_the_pinned_torch():
    req = gpu_req()
    pins = requirements_pins()
    assert req["torch"]["version"] == pins["torch"] and req["torchvision"]["version"] == pins["torchvision"]
    assert req["min_nvidia_driver"] >= MIN_DRIVER_FOR_CUDA[req["torch"]["cuda"]]
    import torch

    if torch.version.cuda and torch.__version__.split("+")[0] == pins["torch"]:
        # The wheel installed here is requirements.txt's: its CUDA is the one stated.
        assert torch.version.cuda == req["torch"]["cuda"], f"torch {torch.__version__} is CUDA {torch.version.cuda}"


def test_every_gpu_image_carries_the_required_driver():
    req = gpu_req()
    need = req["min_nvidia_driver"]
    hosts = req["host_images"]
    for cloud, img in hosts.items():
        assert img["nvidia_driver"] >= need, cloud
    family = re.search(r"nvidia-(\d+)$", hosts["gcp"]["image"])
    assert family and int(family.group(1)) >= need, "the GCP family name states its driver"
    for path in LAUNCHERS:
        cfg = load_one(path)
        cloud = cfg["provider"]["type"]
        assert cfg["docker"]["image"] in req["container_images"], path
        for name, t in cfg["available_node_types"].items():
            node = t["node_config"]
            image = node.get("ImageId") or node["disks"][0]["initializeParams"]["sourceImage"]
            assert image == hosts[cloud]["image"], f"{path.name}/{name}: {image} is not a driver-{need} image"
    base = re.search(r"^FROM\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert base in req["container_images"]


def test_clusters_install_torch_from_requirements_only():
    """The same PyPI wheel as everywhere else: no other torch index or build on a cluster."""
    texts = [(p.name, " ".join(load_one(p)["setup_commands"] + load_one(p)["head_setup_commands"])) for p in LAUNCHERS]
    texts.append(("Dockerfile", (CLUSTER / "Dockerfile").read_text()))
    texts.append(("rayjob", json.dumps(rayjob()["spec"])))
    for where, text in texts:
        assert "download.pytorch.org" not in text and "index-url" not in text, where
        assert not re.search(r"\btorch(vision)?[=<>]", text), f"{where} installs another torch"
    for name, text in texts[:2]:
        assert "pip install -q -r ~/sprout/requirements.txt" in text, name


# ---------------------------------------------------------------- credentials on the nodes


def test_aws_nodes_have_instance_profiles_that_allow_what_they_do():
    cfg = load_one(CLUSTER / "aws.yaml")
    head = cfg["available_node_types"][cfg["head_node_type"]]["node_config"]
    assert head["IamInstanceProfile"] == {"Name": "sprout-ray-head"}
    for name, t in cfg["available_node_types"].items():
        if name != cfg["head_node_type"]:
            assert t["node_config"]["IamInstanceProfile"] == {"Name": "sprout-ray-worker"}, name

    def allowed(policy: dict, action: str, resource: str) -> bool:
        for st in policy["Statement"]:
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
            if st["Effect"] == "Allow" and any(fnmatch.fnmatch(action, a) for a in actions):
                if any(fnmatch.fnmatch(resource, r) for r in resources):
                    return True
        return False

    head_policy = json.loads((CLUSTER / "aws-iam/head-policy.json").read_text())
    worker_policy = json.loads((CLUSTER / "aws-iam/worker-policy.json").read_text())
    trust = json.loads((CLUSTER / "aws-iam/ec2-trust.json").read_text())
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    region = cfg["provider"]["region"]
    param = head["ImageId"].removeprefix("resolve:ssm:")
    # The autoscaler on the head launches workers: the AMI parameter resolves, their profile passes.
    assert allowed(head_policy, "ssm:GetParameters", f"arn:aws:ssm:{region}::parameter{param}")
    assert allowed(head_policy, "iam:PassRole", "arn:aws:iam::123456789012:role/sprout-ray-worker")
    assert not allowed(head_policy, "iam:PassRole", "arn:aws:iam::123456789012:role/admin")
    for action in ("ec2:RunInstances", "ec2:TerminateInstances", "ec2:DescribeInstances", "ec2:CreateTags"):
        assert allowed(head_policy, action, "*"), action
    for policy in (head_policy, worker_policy):  # storage.path in the bucket, from every node
        for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
            assert allowed(policy, action, "arn:aws:s3:::BUCKET/sprout/x"), action
        assert allowed(policy, "s3:ListBucket", "arn:aws:s3:::BUCKET")
        assert not allowed(policy, "s3:GetObject", "arn:aws:s3:::another-bucket/x")
    assert not allowed(worker_policy, "ec2:RunInstances", "*") and not allowed(worker_policy, "iam:PassRole", "*")


def test_gcp_workers_run_as_their_own_service_account():
    cfg = load_one(CLUSTER / "gcp.yaml")
    for name, t in cfg["available_node_types"].items():
        accounts = t["node_config"].get("serviceAccounts")
        if name == cfg["head_node_type"]:
            assert accounts is None, "Ray gives the head ray-autoscaler-sa-v1; do not override it"
            continue
        assert accounts, f"{name}: no service account: the worker has no credentials for the bucket"
        (sa,) = accounts
        assert re.fullmatch(r"sprout-ray-worker@[\w-]+\.iam\.gserviceaccount\.com", sa["email"]), name
        assert sa["scopes"] == ["https://www.googleapis.com/auth/cloud-platform"], name


# ---------------------------------------------------------------- MLflow on launcher clusters


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_mlflow_has_basic_auth_with_credentials_from_a_file(path: Path, tmp_path: Path):
    cfg = load_one(path)
    (server,) = [c for c in cfg["head_start_ray_commands"] if "mlflow server" in c]
    assert "--app-name basic-auth" in server
    assert "--workers 1" in server and "sqlite:///$HOME/" in server, "SQLite only for one process on local disk"
    assert cfg["file_mounts"].get("~/.sprout/mlflow.env") == "~/.sprout/mlflow.env"
    assert "~/.sprout/mlflow.env" in cfg["setup_commands"][0] and "chmod 600" in cfg["setup_commands"][0]
    for cmd in [server, *[c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]]:
        assert "set -a; . ~/.sprout/mlflow.env; set +a;" in cmd, "every node's Ray processes get the credentials"
    assert f'"mlflow[auth]=={version("mlflow")}"' in " ".join(cfg["head_setup_commands"]), "Flask-WTF on the head"
    assert not re.search(r"PASSWORD=[^\"$]", server), "no password written in the YAML"
    # The auth config the head writes, run as the head runs it: the admin is the env file's user.
    ini_cmd = server.split("python -c")[0]
    home = tmp_path / "home"
    (home / ".sprout").mkdir(parents=True)
    (home / ".sprout/mlflow.env").write_text("MLFLOW_TRACKING_USERNAME=alice\nMLFLOW_TRACKING_PASSWORD=pw\n")
    subprocess.run(["bash", "-c", ini_cmd], env={"HOME": str(home), "PATH": os.environ["PATH"]}, check=True)
    ini = configparser.ConfigParser()
    ini.read(home / "mlflow/basic_auth.ini")
    assert ini["mlflow"]["admin_username"] == "alice"
    assert ini["mlflow"]["database_uri"] == f"sqlite:///{home}/mlflow/basic_auth.db"
    assert ini["mlflow"]["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    assert "pw" not in (home / "mlflow/basic_auth.ini").read_text()
    # production stores come from the same file (tests/orchestrator/test_mlflow_server.py runs them)
    (home / ".sprout/mlflow.env").write_text("MLFLOW_TRACKING_USERNAME=alice\nMLFLOW_TRACKING_PASSWORD=pw\n"
                                             "SPROUT_MLFLOW_AUTH_DATABASE_URI=postgresql+psycopg2://mlflow@db:5432/mlflow_auth\n")
    subprocess.run(["bash", "-c", ini_cmd], env={"HOME": str(home), "PATH": os.environ["PATH"]}, check=True)
    ini.read(home / "mlflow/basic_auth.ini")
    assert ini["mlflow"]["database_uri"] == "postgresql+psycopg2://mlflow@db:5432/mlflow_auth"
    for flag, var, default in (("--backend-store-uri", "SPROUT_MLFLOW_BACKEND_STORE_URI", "sqlite:///$HOME/mlflow/mlflow.db"),
                               ("--artifacts-destination", "SPROUT_MLFLOW_ARTIFACTS_DESTINATION", "$HOME/mlflow/artifacts")):
        assert f'{flag} "${{{var}:-{default}}}"' in server, flag


# ---------------------------------------------------------------- the commit on cluster runs


def test_submit_wrapper_carries_the_commit_in_the_runtime_env(tmp_path: Path):
    """cluster/submit.sh calls `ray job submit` with cluster/runtime_env.yaml plus
    SPROUT_GIT_SHA = the checkout's HEAD (a stand-in `ray` on PATH records its argv)."""
    from ray.runtime_env import RuntimeEnv

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.json"
    fake = bin_dir / "ray"
    fake.write_text(f'#!/usr/bin/env python3\nimport json, sys\njson.dump(sys.argv[1:], open("{record}", "w"))\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("SPROUT_GIT_SHA", None)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    cmd = [str(CLUSTER / "submit.sh"), "--address", "http://127.0.0.1:8265", "--", "sprout", "train", "x.yaml"]
    subprocess.run(cmd, env=env, check=True, cwd=tmp_path)
    argv = json.loads(record.read_text())
    assert argv[:2] == ["job", "submit"]
    renv = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert renv["env_vars"].pop("SPROUT_GIT_SHA") == head.stdout.strip()
    assert renv == runtime_env(), "the rest is cluster/runtime_env.yaml as it is"
    assert argv[argv.index("--working-dir") + 1] == str(REPO)
    assert "--runtime-env" not in argv, "Ray 2.60 takes one of --runtime-env and --runtime-env-json"
    assert argv[-5:] == ["http://127.0.0.1:8265", "--", "sprout", "train", "x.yaml"]
    RuntimeEnv(**json.loads(argv[argv.index("--runtime-env-json") + 1]))
    # A commit given in the shell wins.
    subprocess.run(cmd, env={**env, "SPROUT_GIT_SHA": "abc1234"}, check=True, cwd=tmp_path)
    argv = json.loads(record.read_text())
    assert json.loads(argv[argv.index("--runtime-env-json") + 1])["env_vars"]["SPROUT_GIT_SHA"] == "abc1234"


def test_image_carries_its_commit():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^ARG GIT_SHA\b", text, re.MULTILINE)
    assert re.search(r"^ENV SPROUT_GIT_SHA=\$\{GIT_SHA\}$", text, re.MULTILINE)
    assert "--build-arg GIT_SHA=$(git rev-parse HEAD)" in text.splitlines()[0]


# ---------------------------------------------------------------- docs


def test_docs_reference_existing_cluster_files():
    text = (REPO / "docs" / "cluster.md").read_text()
    referenced = set(re.findall(r"cluster/[\w./-]+\.(?:yaml|md|sh|json|Dockerfile)|cluster/Dockerfile", text))
    assert referenced
    for rel in referenced:
        assert (REPO / rel).is_file(), f"docs/cluster.md names {rel}, which does not exist"
    assert "ray job submit --address http://127.0.0.1:8265" in text
    assert "--runtime-env cluster/runtime_env.yaml --working-dir ." in text


def test_docs_state_the_gpu_requirement_node_types_and_timeouts():
    text = DOCS.read_text()
    req = gpu_req()
    assert f"NVIDIA driver {req['min_nvidia_driver']} or newer" in text
    assert f"torch=={req['torch']['version']}" in text and f"CUDA {req['torch']['cuda']}" in text
    assert req["host_images"]["gcp"]["image"].rsplit("/", 1)[1] in text
    rows = {r[0].strip(): r for r in (line.strip("|").split("|") for line in text.splitlines() if line.startswith("|"))}
    for name, t in req["kuberay_node_types"].items():
        assert name in rows, f"docs/cluster.md has no row for node type {name}"
        alloc = t["allocatable"]
        assert f"{alloc['cpu']} / {alloc['memory']}" in rows[name][2], f"{name}: allocatable differs from the data"
    for cloud, types in req["launcher_node_types"].items():
        for name, t in types.items():
            if t["gpus"]:
                assert re.search(rf"`{name}` \| {re.escape(t['instance'])}\b", text), f"{cloud} {name} not in the table"
    assert re.search(r"scaling\.startup_timeout_s` (to at least|≥) 1200 s", text)
    assert "SPROUT_GIT_SHA" in text and "cluster/submit.sh" in text


# ---------------------------------------------------------------- the autoscaler's maximum


def _manifest_of(where: str) -> Path:
    kind, name = where.split("/")[:2]
    for path in sorted(KUBERAY.glob("*.yaml")):
        if any(d.get("kind") == kind and d["metadata"]["name"] == name for d in load_docs(path) if isinstance(d, dict)):
            return path
    raise AssertionError(f"no manifest defines {where}")


@pytest.mark.parametrize("where", [w for w, _ in raycluster_specs()])
def test_kuberay_head_reads_the_autoscaler_maximum_from_its_own_manifest(where: str):
    """KubeRay's autoscaler is a sidecar `sprout` cannot ask: the head gets its own manifest from a
    ConfigMap (SPROUT_AUTOSCALER_CONFIG), so an idle cluster's plans are checked against maxReplicas."""
    from orchestrator.autoscaler import CONFIG_ENV, limits_from_file, limits_from_raycluster

    spec = dict(raycluster_specs())[where]
    pod = spec["headGroupSpec"]["template"]["spec"]
    (head,) = [c for c in pod["containers"] if c["name"] == "ray-head"]
    path = env_of(head)[CONFIG_ENV]["value"]
    mount = next(m for m in head["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = volume["configMap"]["name"]
    manifest = _manifest_of(where)
    key = path.rsplit("/", 1)[1]
    assert key == manifest.name  # the file the documented `kubectl create configmap --from-file` gives
    command = f"kubectl -n sprout create configmap {configmap}"
    docs = DOCS.read_text()
    assert command in docs and f"--from-file=cluster/kuberay/{key}" in docs.split(command, 1)[1].splitlines()[0]
    lim = limits_from_file(str(manifest))  # what that head reads
    assert lim.maximum == limits_from_raycluster(load_one(manifest), "x").maximum and lim.maximum["GPU"] > 0


@pytest.mark.parametrize("cluster_file", [*LAUNCHERS, KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml"],
                         ids=lambda p: p.name)
def test_every_gpu_preset_fits_every_shipped_clusters_maximum(cluster_file: Path, tmp_path: Path):
    """An idle cluster refuses only what it can never run: every GPU preset fits the maximum of
    every cluster file we ship (the ImageNet presets' 16 GPUs were refused on KubeRay before)."""
    from orchestrator.autoscaler import limits_from_file
    from orchestrator.config import load_config
    from orchestrator.session import Capacity, check_plan, plan_for

    lim = limits_from_file(str(cluster_file))
    assert lim.maximum, cluster_file
    idle = Capacity(now={"CPU": 0.0}, maximum=lim.maximum, node_types=lim.node_types, autoscaler=True,
                    source=str(cluster_file))
    checked = []
    for preset in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(preset, [f"data.root={tmp_path}"])
        if cfg.scaling.use_gpu:
            check_plan(plan_for(cfg), idle)  # raises ConfigError (exit 2) if it could never fit
            checked.append(preset.stem)
    assert {"imagenet_resnet152", "imagenet_resnet50", "cifar10_vgg16"} <= set(checked), checked
