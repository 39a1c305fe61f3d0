"""The cluster manifests under cluster/: they parse, pin the installed Ray, run the same `sprout`
command, keep the uploaded working dir small, request GPUs, share storage, and keep the
dashboard, job API, Ray client and MLflow ports private with Ray's token auth on.

Fast and offline: no Ray cluster, no cloud, no Kubernetes. Ray's own helpers are used where
they define the semantics (runtime_env validation, working-dir packing, the launcher schema).
"""

from __future__ import annotations

import copy
import re
import shlex
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
RAY_VERSION = ray.__version__
PRIVATE_PORTS = {8265, 5000, 10001, 6379}
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
    ]:
        assert (CLUSTER / rel).is_file(), f"cluster/{rel} is missing"


@pytest.mark.parametrize("path", all_yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_parses_safely_and_opens_with_its_launch_command(path: Path):
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Launch: "), f"{path} must open with a '# Launch: <command>' comment"


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
    for path in [*all_yaml_files(), CLUSTER / "Dockerfile"]:
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
            assert node["scheduling"][0]["onHostMaintenance"] == "TERMINATE", f"{name}: GPU VMs cannot live-migrate"
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


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_firewall_opens_nothing_but_ssh_to_the_world(path: Path):
    cfg = load_one(path)
    if cfg["provider"]["type"] == "aws":
        # A named group: Ray uses a pre-created one as it is (SSH from the user's CIDR only).
        assert cfg["provider"]["security_group"]["GroupName"]
    for where, node in walk(cfg):
        ranges = [r.get("CidrIp") for r in node.get("IpRanges", [])] + list(node.get("sourceRanges", []))
        ranges += [r.get("CidrIpv6") for r in node.get("Ipv6Ranges", [])]
        if not ranges:
            continue
        lo, hi = node.get("FromPort", -1), node.get("ToPort", -1)
        ports = set(range(lo, hi + 1)) if lo >= 0 else set(range(0, 65536))
        assert not (ports & PRIVATE_PORTS), f"{path}{where} opens {sorted(ports & PRIVATE_PORTS)}"
        if {"0.0.0.0/0", "::/0"} & set(ranges):
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


def test_kuberay_shared_storage_on_every_pod():
    (pvc,) = kube("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    claim = pvc["metadata"]["name"]
    templates = [(w, t) for w, _, t in ray_pod_templates()]
    templates += [(f"Deployment/{d['metadata']['name']}", d["spec"]["template"]) for d in kube("Deployment")]
    for where, template in templates:
        vols = {v["name"]: v for v in template["spec"].get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert "/mnt/shared" in mounts, f"{where}: /mnt/shared not mounted"
        assert vols[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"] == claim, where


def test_kuberay_pods_reach_the_in_cluster_mlflow_service():
    (svc,) = [s for s in kube("Service") if s["metadata"]["name"] == "mlflow"]
    ns = svc["metadata"]["namespace"]
    assert [p["port"] for p in svc["spec"]["ports"]] == [5000]
    uri = f"http://mlflow.{ns}.svc:5000"
    for where, _, template in ray_pod_templates():
        env = env_of(template["spec"]["containers"][0])
        assert env["MLFLOW_TRACKING_URI"]["value"] == uri, where
    (deploy,) = [d for d in kube("Deployment") if d["metadata"]["name"] == "mlflow"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["image"].endswith(f":v{version('mlflow')}"), "the server runs the pinned MLflow"
    args = " ".join(container["args"])
    assert "mlflow server" in args and "--port 5000" in args
    assert re.search(rf"--allowed-hosts \S*mlflow\.{re.escape(ns)}\.svc", args), "in-cluster Host header allowed"
    assert "--allowed-hosts *" not in args and "--allowed-hosts '*'" not in args


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


def test_kuberay_network_policy_admits_only_the_namespace_and_operator():
    (policy,) = kube("NetworkPolicy")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert "Ingress" in policy["spec"]["policyTypes"]
    for rule in policy["spec"]["ingress"]:
        for peer in rule["from"]:
            assert "ipBlock" not in peer, "no CIDR-based access"
            if "namespaceSelector" in peer:  # other namespaces: the operator, dashboard port only
                assert peer["podSelector"]["matchLabels"], "other namespaces only for a selected operator pod"
                assert [p["port"] for p in rule["ports"]] == [8265]
    labelled = [(w, t) for w, _, t in ray_pod_templates()]
    labelled += [(f"Deployment/{d['metadata']['name']}", d["spec"]["template"]) for d in kube("Deployment")]
    for where, template in labelled:
        labels = template["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{where} is not covered by the NetworkPolicy"


def test_kuberay_objects_share_one_namespace():
    namespaces = {o["metadata"].get("namespace") for o in kube_objects()}
    assert len(namespaces) == 1 and None not in namespaces, namespaces


# ---------------------------------------------------------------- docs


def test_docs_reference_existing_cluster_files():
    text = (REPO / "docs" / "cluster.md").read_text()
    referenced = set(re.findall(r"cluster/[\w./-]+\.(?:yaml|md)|cluster/Dockerfile", text))
    assert referenced
    for rel in referenced:
        assert (REPO / rel).is_file(), f"docs/cluster.md names {rel}, which does not exist"
    assert "ray job submit --address http://127.0.0.1:8265" in text
    assert "--runtime-env cluster/runtime_env.yaml --working-dir ." in text
