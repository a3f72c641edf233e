"""The cluster manifests against the project: cluster/rayjob.yaml (KubeRay) and
cluster/gpu-cluster.yaml (ray up). Loaded with PyYAML; no cluster needed."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import yaml
from repo_copy import PARAMS

from pipeline.cluster import blocks, stopping, storage
from stages import repro

REPO = Path(__file__).resolve().parents[1]


def _docs(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((REPO / "cluster" / name).read_text()) if d}


def _env(container: dict) -> dict[str, str | None]:
    """A container's environment: plain values, None for one from a Secret."""
    return {e["name"]: e.get("value") for e in container["env"]}


def _source_strings() -> str:
    """Every line of the pipeline's and stages' code (where environment variables are read)."""
    files = [*(REPO / "pipeline").rglob("*.py"), *(REPO / "stages").glob("*.py")]
    return "\n".join(p.read_text() for p in files)


def _pods(job: dict) -> list[dict]:
    spec = job["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def test_rayjob_runs_an_existing_entrypoint_of_a_real_preset():
    job = _docs("rayjob.yaml")["RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"]
    module = REPO / (argv[2].replace(".", "/") + ".py")
    assert module.is_file(), module
    scale = argv[argv.index("--scale") + 1]
    assert scale in yaml.safe_load(PARAMS.read_text())["presets"]
    assert job["spec"]["backoffLimit"] > 0  # a retried job resumes (docs/cluster.md)
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert re.match(r"^(https|s3|gs)://.+\.zip$", runtime_env["working_dir"])  # code as a URI


def test_rayjob_cpu_head_gpu_workers_and_volumes():
    job = _docs("rayjob.yaml")["RayJob"]
    spec = job["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    assert [g["groupName"] for g in spec["workerGroupSpecs"]] == ["gpu8", "gpu8-spot"]
    for group in spec["workerGroupSpecs"]:  # on-demand and spot: the same 8-GPU workers
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "8" and group["minReplicas"] == 0
    assert spec["enableInTreeAutoscaling"] is True
    for pod in _pods(job):
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        cache = _env(container)[storage.NODE_CACHE_ENV]
        assert "emptyDir" in volumes[mounts[cache]] or "hostPath" in volumes[mounts[cache]]


def test_rayjob_storage_is_one_shared_volume_at_the_path_the_code_is_given():
    claim, job = _docs("storage-pvc.yaml")["PersistentVolumeClaim"], _docs("rayjob.yaml")["RayJob"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    path = runtime_env[storage.ENV]
    for pod in _pods(job):
        (container,) = pod["containers"]
        assert _env(container)[storage.ENV] == path  # the same path on every node and in the job
        claims = {
            v["name"]
            for v in pod["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]
        }
        mounted = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims]
        assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounted), mounted


def test_rayjob_environment_variables_are_ones_the_code_reads():
    job = _docs("rayjob.yaml")["RayJob"]
    names = set(yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"])
    for pod in _pods(job):
        names |= {e["name"] for e in pod["containers"][0]["env"]}
    code = _source_strings()
    # read by a library, not by our code: checked in the installed library's source
    by_library = {"MLFLOW_TRACKING_USERNAME": "mlflow", "MLFLOW_TRACKING_PASSWORD": "mlflow"}
    unread = sorted(n for n in names - set(by_library) if f'"{n}"' not in code)
    assert unread == []
    for name in names & set(by_library):
        (library,) = importlib.util.find_spec(by_library[name]).submodule_search_locations
        library = Path(library)  # the installed package's folder, without importing it
        assert any(name in p.read_text() for p in library.rglob("environment_variables.py")), name
    assert {storage.ENV, storage.NODE_CACHE_ENV, blocks.GPU_WAIT_ENV} <= names
    assert not any(n.startswith("DDPM_TEST") for n in names)


def test_ray_up_cluster_cpu_head_no_idle_gpu_node_and_its_fixes():
    text = (REPO / "cluster" / "gpu-cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert "p5" not in head["node_config"]["InstanceType"]  # a CPU head
    gpu_types = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types)
    for t in types.values():
        assert t["node_config"]["SecurityGroupIds"]  # NFS (EFS) needs a security group
    setup = "\n".join(cfg["setup_commands"])
    assert re.search(
        r"--index-url https://download\.pytorch\.org/whl/cu\d+ torch==[\d.]+\+cu\d+", setup
    )
    assert "s3:DeleteObject" in text
    starts = "\n".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    code = _source_strings()
    for name in set(re.findall(r"\b(DDPM_[A-Z_]+)=", starts)):
        assert f'"{name}"' in code, name


def test_rayjob_spot_group_is_the_gpu8_workers_on_spot_nodes_preferred():
    """gpu8-spot: gpu8's pod on nodes of capacity type SPOT (EKS), the name Ray's autoscaler
    prefers on a tie (the one that sorts last)."""
    spec = _docs("rayjob.yaml")["RayJob"]["spec"]["rayClusterSpec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    spot, on_demand = groups["gpu8-spot"], groups["gpu8"]
    pod = spot["template"]["spec"]
    assert pod["nodeSelector"] == {"eks.amazonaws.com/capacityType": "SPOT"}
    assert "nodeSelector" not in on_demand["template"]["spec"]
    assert {k: v for k, v in pod.items() if k != "nodeSelector"} == on_demand["template"]["spec"]
    assert spot["maxReplicas"] > 0 and spot["minReplicas"] == 0
    assert max(groups) == "gpu8-spot"


def test_ray_up_spot_type_is_gpu8_on_spot_capacity_preferred():
    """gpu8_spot: gpu8's node config (AMI, subnets, security group, profile) asking for one-time
    spot capacity; preferred by name (autoscaler v1) and by priority (v2); never idling."""
    cfg = yaml.safe_load((REPO / "cluster" / "gpu-cluster.yaml").read_text())
    types = cfg["available_node_types"]
    spot, on_demand = types["gpu8_spot"], types["gpu8"]
    market = spot["node_config"]["InstanceMarketOptions"]
    assert market["MarketType"] == "spot"
    assert market["SpotOptions"]["InstanceInterruptionBehavior"] == "terminate"
    assert "MaxPrice" not in market["SpotOptions"]  # at most the on-demand price
    assert "InstanceMarketOptions" not in on_demand["node_config"]
    same = {k: v for k, v in spot["node_config"].items() if k != "InstanceMarketOptions"}
    assert same == on_demand["node_config"]
    assert spot["min_workers"] == 0 and spot["max_workers"] > 0
    assert max(n for n in types if n != cfg["head_node_type"]) == "gpu8_spot"
    assert spot["priority"] > on_demand.get("priority", 0)


def test_rayjob_alone_in_its_file_and_its_storage_outlives_it():
    docs = list(yaml.safe_load_all((REPO / "cluster" / "rayjob.yaml").read_text()))
    assert [d["kind"] for d in docs if d] == ["RayJob"]  # `kubectl delete -f` deletes no data
    storage_docs = _docs("storage-pvc.yaml")
    claim, retain = storage_docs["PersistentVolumeClaim"], storage_docs["StorageClass"]
    assert claim["spec"]["storageClassName"] == retain["metadata"]["name"]
    assert retain["reclaimPolicy"] == "Retain"


def test_rayjob_stop_grace_fits_the_stages_stop_and_the_pods_outlast_it():
    job = _docs("rayjob.yaml")["RayJob"]
    wait = float(yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"][stopping.WAIT_ENV])
    assert wait >= stopping.RECOMMENDED_WAIT_S
    # the stopped stage gets its whole grace inside Ray's wait (stages/repro.py, stopping.py)
    assert wait - stopping.MARGIN_S >= repro.GRACE_S
    for pod in _pods(job):
        assert pod["terminationGracePeriodSeconds"] > wait


def test_rayjob_pods_run_as_rays_user_and_own_their_volumes():
    for pod in _pods(_docs("rayjob.yaml")["RayJob"]):
        security = pod["securityContext"]
        assert security["runAsUser"] == 1000  # Ray's images' user
        assert security["fsGroup"] == security["runAsGroup"]


def test_rayjob_asks_for_the_token_and_stays_inside_the_cluster():
    job = _docs("rayjob.yaml")["RayJob"]
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False
    assert head["rayStartParams"]["num-cpus"] == "0"
    names = {e["name"] for pod in _pods(job) for e in pod["containers"][0]["env"]}
    assert "RAY_AUTH_MODE" not in names  # KubeRay sets it with the token; never "disabled"
    policy = _docs("networkpolicy.yaml")["NetworkPolicy"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert all("ipBlock" not in f for rule in policy["spec"]["ingress"] for f in rule["from"])


def test_rayjob_mlflow_is_https_with_credentials_from_a_secret():
    job = _docs("rayjob.yaml")["RayJob"]
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert runtime_env["MLFLOW_TRACKING_URI"].startswith("https://")
    assert not any("PASSWORD" in n or "TOKEN" in n for n in runtime_env)
    for pod in _pods(job):
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["MLFLOW_TRACKING_URI"]["value"].startswith("https://")
        assert "@" not in env["MLFLOW_TRACKING_URI"]["value"]  # no userinfo in the URI
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert "secretKeyRef" in env[name]["valueFrom"], name


def test_rayjob_image_recipe_can_fetch_a_bucket_working_dir():
    text = (REPO / "cluster" / "rayjob.yaml").read_text()
    recipe = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert re.search(r"boto3==[\d.]+", recipe) and re.search(r"smart_open\[s3\]==[\d.]+", recipe)


def test_rayjob_head_waits_for_its_stopped_jobs_within_the_pod_grace():
    job = _docs("rayjob.yaml")["RayJob"]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    command = head["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    script = command[2]
    compile(script, "preStop", "exec")  # the hook is Python the image runs
    assert "stop_job" in script and "127.0.0.1:8265" in script
    (wait,) = (float(w) for w in re.findall(r"time\.monotonic\(\) \+ (\d+)", script))
    wait_env = float(yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"][stopping.WAIT_ENV])
    assert wait_env <= wait < head["terminationGracePeriodSeconds"]
