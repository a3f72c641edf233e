"""The tiny preset as ``ray job submit`` on two nodes that share nothing but cluster storage.

Real components (tests/two_node.py): a ``ray start --head`` node and a second node in its own
mount namespace that cannot see the checkout, /tmp or /dev/shm of the head; a real ``mlflow
server`` with MLflow's basic-auth app (the job logs as a user made for the test); DVC with
the storage remote. a. (default suite): the job succeeds with one training
worker on each node and blocks on both, which Ray's own task and actor records (node ids) show;
MLflow holds every metric; storage holds the checkpoints, the data, the blocks, the DVC remote.
b. (default suite, dvc.yaml cut to prepare and train): a job stopped (``ray job stop``) during
training and resubmitted after an edit restores the state, skips prepare, resumes from the
stored checkpoint and ends with EMA weights bit-identical to a.'s (job a. is a module fixture:
b. runs it when run alone). b. and c. (slow, the whole pipeline): the same, and a second job
submitted while the first runs is refused by the storage lease, and a fresh clone gets every
output with ``dvc pull`` from the storage remote. (slow) a. with the storage in an s3://
bucket (a moto server, tests/moto_s3.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from repo_copy import BIN, copy_repo, env
from test_end_to_end import check_results, variant_runs
from train_project import registered
from two_node import (
    TwoNodes,
    auth_mlflow_server,
    can_run,
    job_client,
    state_list,
    two_nodes,
)

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(can_run() is not None, reason=str(can_run()))]

VARIANT = "eps_fixed_mse"  # one variant suffices (the single-node tests run all six)


@pytest.fixture(scope="module")
def cluster():
    with two_nodes() as nodes:
        yield nodes


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """An authenticated MLflow server (MLflow's basic-auth app): the jobs log to it as its user
    (the credentials in the job's environment), and this process reads it as that user."""
    with (
        auth_mlflow_server(tmp_path_factory.mktemp("mlflow")) as server,
        pytest.MonkeyPatch.context() as patch,
    ):
        for name, value in server.user.items():
            patch.setenv(name, value)
        yield server


def project(dest: Path) -> Path:
    """A copy of the repo at the tiny scale, one variant, two training workers (one a node)."""
    repo = copy_repo(dest, variants={VARIANT})
    # Ray reuses the extracted working directory of an identical package (an earlier job's,
    # outputs and all: DVC then finds everything done), so every project is a package of its own
    (repo / "README.md").write_text((repo / "README.md").read_text() + f"\nproject {dest}\n")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["presets"]["tiny"]["train"]["num_workers"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo


def submit(
    cluster: TwoNodes, repo: Path, env_vars: dict[str, str], log: Path | None = None
) -> subprocess.CompletedProcess | subprocess.Popen:
    """``ray job submit --working-dir repo -- python -m stages.repro``; with ``log``, don't wait."""
    cmd = [
        BIN / "ray", "job", "submit", "--address", cluster.dashboard_url,
        "--working-dir", str(repo), "--runtime-env-json", json.dumps({"env_vars": env_vars}),
        "--", "python", "-m", "stages.repro",
    ]  # fmt: skip
    job_env = env(**cluster.client_env)
    if log is None:
        return subprocess.run(cmd, env=job_env, capture_output=True, text=True)
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=job_env, stdout=out, stderr=subprocess.STDOUT)


def placements(cluster: TwoNodes, storage: Path) -> dict[str, set[str]]:
    """Node ids of the head, the other node, the training ranks and the block tasks.

    The ranks record their node in storage (``nodes/`` of the run); the block tasks are Ray's
    task records.
    """
    nodes = state_list(cluster, "nodes", limit=10)
    tasks = state_list(cluster, "tasks", limit=9999)  # blocks: pipeline.cluster.gputasks' _call
    block_fns = ("_run_block", "_call", "_call_on_gpu")
    blocks = [t for t in tasks if t.func_or_class_name.split(".")[-1] in block_fns]
    return {
        "head": {n.node_id for n in nodes if n.is_head_node},
        "other": {n.node_id for n in nodes if not n.is_head_node},
        "train": {
            json.loads(f.read_text())["node_id"]
            for f in storage.glob("checkpoints/*/*/nodes/rank-*.json")
        },
        "blocks": {t.node_id for t in blocks if t.node_id},
    }


def du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def job_a(cluster, tracking, tmp_path_factory) -> tuple[Path, float, subprocess.CompletedProcess]:
    """Job a., an uninterrupted run: (its storage, seconds, the submission). Test a. checks it;
    b. compares its resumed weights with it, whichever test runs first or alone."""
    repo = project(tmp_path_factory.mktemp("a") / "repo")  # one variant: CI time
    storage = cluster.storage / "a"
    shutil.rmtree(storage, ignore_errors=True)
    start = time.perf_counter()
    env_vars = {"MLFLOW_TRACKING_URI": tracking.uri, **tracking.user}
    env_vars["DDPM_CLUSTER_STORAGE"] = str(storage)
    job = submit(cluster, repo, env_vars)
    return storage, time.perf_counter() - start, job


def test_a_job_trains_and_computes_blocks_on_both_nodes(cluster, job_a, tracking, tmp_path):
    storage, seconds, job = job_a
    assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-6000:] + job.stderr
    where = placements(cluster, storage)
    assert len(list(storage.glob("checkpoints/*/*/nodes/rank-*.json"))) == 2  # ranks 0 and 1
    assert where["train"] == where["head"] | where["other"], where  # one rank on each node
    assert where["blocks"] == where["head"] | where["other"], where  # blocks on both
    runs = variant_runs(tracking.uri)
    check_results(runs, tables_from_mlflow(tmp_path), {VARIANT})
    sizes = {p.name: du(p) for p in sorted(storage.iterdir()) if p.is_dir()}
    weights = [du(run) for run in storage.glob("checkpoints/*/*/checkpoint_000000008")]
    print(
        f"\ntwo-node job a.: {seconds:.0f} s; storage bytes by folder: {sizes}; "
        f"a final checkpoint {weights[0]} bytes (model, EMA and Adam: ~4x the weights); "
        f"object store: every block result (= the shards, {sizes['work']} bytes in all) and "
        f"the weights once per node and block run; training ranks: gloo all-reduce over TCP"
    )
    assert {"checkpoints", "data", "work", "dvc", "state"} <= set(sizes)
    (run,) = (storage / "checkpoints" / VARIANT).iterdir()
    assert (run / "checkpoint_000000008" / "state.pt").is_file()
    assert "Running stage" in job.stdout


def resumable_project(dest: Path) -> Path:
    """project() with dvc.yaml cut to config, prepare and train: what a stop during training and its
    resubmission go through (train's dependency on the training reference is left out: tiny
    does not evaluate during training, so that stage writes a constant)."""
    repo = project(dest)
    dvc = yaml.safe_load((repo / "dvc.yaml").read_text())
    stages = {name: dvc["stages"][name] for name in ("config", "prepare", "train")}
    stages["train"]["do"]["deps"].remove("work/train-reference/${scale}.json")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    return repo


def wait_for_checkpoint(runs: Path, step: int, job: subprocess.Popen, log: Path) -> None:
    """Until rank 0 hangs (``hang:0:STEP`` after the checkpoint of ``step``, which its report
    wrote) and Ray Train's controller has registered that checkpoint (its snapshot names it:
    what a resubmission resumes from)."""
    name = f"checkpoint_{step:09d}"
    deadline = time.monotonic() + 600
    while not (list(runs.glob("*/.test-fault-hang-0-*")) and registered(runs, name)):
        assert job.poll() is None, f"the job ended first: {log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {name} in 600 s: {log.read_text()[-4000:]}"
        time.sleep(0.5)


def test_b_a_job_stopped_in_training_and_resubmitted_resumes_bit_identical(
    cluster, job_a, tracking, tmp_path
):
    """b. in the default suite: a job stopped (``ray job stop``) during training on the two
    nodes and resubmitted after an edit restores the state, skips the finished stage (prepare),
    resumes training from the checkpoint of step 4 in storage and ends with EMA weights
    bit-identical to job a.'s (the uninterrupted run of the same params: a module fixture, so
    this test needs no other test). dvc.yaml is cut to prepare and train (CI time); the slow
    b./c. test runs the whole pipeline, the lease and ``dvc pull``."""
    repo = resumable_project(tmp_path / "repo")
    storage = cluster.storage / "resume"
    shutil.rmtree(storage, ignore_errors=True)
    env_vars = {
        "MLFLOW_TRACKING_URI": tracking.uri,
        **tracking.user,
        "DDPM_CLUSTER_STORAGE": str(storage),
        "DDPM_TEST_FAULT": "hang:0:6",  # rank 0 hangs before step 6, after the checkpoint at 4
    }
    start = time.perf_counter()
    first = tmp_path / "first.log"
    hung = submit(cluster, repo, env_vars, first)
    runs = storage / "checkpoints" / VARIANT
    try:
        wait_for_checkpoint(runs, 4, hung, first)
        stopped_at = time.perf_counter() - start
        stop_job(cluster, hung)
    finally:
        if hung.poll() is None:
            hung.kill()
    first_log = first.read_text()
    assert "Running stage 'prepare'" in first_log, first_log[-4000:]
    assert f"Running stage 'train@{VARIANT}'" in first_log
    assert not list(runs.glob("*/checkpoint_000000008"))  # stopped before the end
    (repo / "README.md").write_text((repo / "README.md").read_text() + "\nedited\n")  # new package
    second = submit(cluster, repo, env_vars)
    seconds = time.perf_counter() - start
    log = second.stdout
    assert second.returncode == 0 and "succeeded" in log, log[-6000:] + second.stderr
    assert "restored the state of an earlier run" in log, log[-6000:]
    assert "Stage 'prepare' didn't change, skipping" in log, log[-6000:]
    assert "Running stage 'prepare'" not in log
    assert f"trained {VARIANT} (resumed at step 4): 8 steps" in log, log[-6000:]
    assert job_a[2].returncode == 0, job_a[2].stdout[-3000:]
    (ran,), (uninterrupted,) = runs.iterdir(), (job_a[0] / "checkpoints" / VARIANT).iterdir()
    assert ran.name == uninterrupted.name  # the same run identity (config, data)
    reference, resumed = final_ema(job_a[0], VARIANT, 8), final_ema(storage, VARIANT, 8)
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    print(
        f"\ntwo-node b. (default suite): stopped at step 4 after {stopped_at:.0f} s, resumed "
        f"and finished: {seconds:.0f} s in all"
    )


@pytest.mark.slow
def test_a_job_with_bucket_storage_runs_on_both_nodes(cluster, tracking, tmp_path):
    """Case a. with ``s3://`` storage (a moto server on 127.0.0.1, which the second node reaches:
    it shares the network namespace): ranks on both nodes, data, blocks and remote in the bucket.
    """
    from moto_s3 import list_keys, make_bucket, moto_server, read_object, s3_env

    repo = project(tmp_path / "repo")
    with moto_server(tmp_path / "moto.log") as endpoint:
        make_bucket(endpoint, "two-node")
        env_vars = {
            "MLFLOW_TRACKING_URI": tracking.uri,
            **tracking.user,
            "DDPM_CLUSTER_STORAGE": "s3://two-node/a",
            **s3_env(endpoint),
        }
        start = time.perf_counter()
        job = submit(cluster, repo, env_vars)
        seconds = time.perf_counter() - start
        assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-6000:] + job.stderr
        keys = list_keys(endpoint, "two-node", "a/")
        ranks = [k for k in keys if "/nodes/rank-" in k]
        assert len(ranks) == 2, ranks
        trained = {json.loads(read_object(endpoint, "two-node", k))["node_id"] for k in ranks}
    nodes = {n.node_id for n in state_list(cluster, "nodes", limit=10)}
    assert trained == nodes, (trained, nodes)  # one rank on each node, each read the data
    top = {k.split("/")[1] for k in keys}
    assert {"checkpoints", "data", "work", "dvc", "state"} <= top, top
    print(f"\ntwo-node job a. with s3:// storage: {seconds:.0f} s, {len(keys)} objects")


def tables_from_mlflow(tmp_path: Path) -> dict:
    import mlflow
    import pandas as pd

    parent = mlflow.search_runs(
        experiment_names=["ddpm-repro"], filter_string="tags.`ddpm.role` = 'reproduction'"
    )
    assert len(parent) == 1
    client = mlflow.MlflowClient()
    tables = {}
    for t in ("table1", "table2", "table4"):
        local = client.download_artifacts(parent["run_id"][0], f"tables/{t}.csv", str(tmp_path))
        tables[t] = pd.read_csv(local)
    return tables


def test_a_job_without_a_durable_mlflow_store_stops_before_any_work(cluster, tmp_path):
    repo = copy_repo(tmp_path / "repo", variants={VARIANT})
    job = submit(cluster, repo, {"DDPM_CLUSTER_STORAGE": str(cluster.storage / "nomlflow")})
    assert job.returncode != 0
    errors = {line for line in job.stdout.splitlines() if line.startswith("error:")}
    assert len(errors) == 1, job.stdout[-3000:]  # (ray job submit shows the log twice)
    assert "MLFLOW_TRACKING_URI is not set" in errors.pop()
    assert "Running stage" not in job.stdout
    assert not (cluster.storage / "nomlflow" / "data").exists()


def final_ema(storage: Path, variant: str, step: int) -> dict[str, torch.Tensor]:
    (run,) = (storage / "checkpoints" / variant).iterdir()
    state = torch.load(run / f"checkpoint_{step:09d}" / "state.pt", weights_only=True)
    return state["ema"]


@pytest.mark.slow
def test_b_c_a_stopped_job_resubmitted_continues_and_a_clone_pulls_everything(
    cluster, job_a, tracking, tmp_path
):
    """b. stop during training, edit, resubmit: resumes, skips, same weights as job a.; while
    the first job runs, a second on the same storage is refused (the lease); c. dvc pull."""
    repo = project(tmp_path / "repo")  # a package of its own (project())
    storage = cluster.storage / "b"
    env_vars = {"MLFLOW_TRACKING_URI": tracking.uri, **tracking.user}
    env_vars["DDPM_CLUSTER_STORAGE"] = str(storage)
    start = time.perf_counter()
    first = tmp_path / "first.log"
    hung = submit(cluster, repo, {**env_vars, "DDPM_TEST_FAULT": "hang:0:6"}, first)
    runs = storage / "checkpoints" / VARIANT
    wait_for_checkpoint(runs, 4, hung, first)  # registered: what the resubmission resumes from
    rival = submit(cluster, repo, env_vars)  # the same storage while the first job runs
    running = running_job(cluster)
    refused = {line for line in rival.stdout.splitlines() if line.startswith("error: job ")}
    assert rival.returncode != 0 and len(refused) == 1, rival.stdout[-3000:]
    assert f"`ray job stop {running}`" in refused.pop()
    stop_job(cluster, hung)  # SIGKILL 3 s after SIGTERM (Ray's default wait): the lease may stay
    first_log = first.read_text()
    assert "Running stage 'train@" in first_log
    (repo / "README.md").write_text((repo / "README.md").read_text() + "\nedited\n")  # new package
    second = submit(cluster, repo, {**env_vars, "DDPM_TEST_FAULT": "hang:0:6"})
    seconds = time.perf_counter() - start
    assert second.returncode == 0 and "succeeded" in second.stdout, second.stdout[-6000:]
    log = second.stdout
    assert "restored the state of an earlier run" in log
    for stage in ("prepare", "reference"):
        assert f"Stage '{stage}' didn't change, skipping" in log, log[-6000:]
        assert f"Running stage '{stage}'" not in log
    assert "resumed at step 4" in log or "from step 4" in log, log[-6000:]
    assert job_a[2].returncode == 0, job_a[2].stdout[-3000:]
    reference = final_ema(job_a[0], VARIANT, 8)
    resumed = final_ema(storage, VARIANT, 8)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    ran = [line for line in log.splitlines() if line.startswith("Running stage")]
    print(f"\ntwo-node b. (stop, edit, resubmit): {seconds:.0f} s; storage: {du(storage)} bytes")
    print(f"resubmission ran: {ran}; {[x for x in log.splitlines() if 'resumed' in x]}")

    clone = project(tmp_path / "clone")  # c. a fresh clone elsewhere
    shutil.rmtree(clone / "dvc.lock", ignore_errors=True)
    state = storage / "state" / "tiny"
    shutil.copy2(state / "dvc.lock", clone / "dvc.lock")
    dvc = [BIN / "dvc"]
    subprocess.run([*dvc, "remote", "add", "-d", "s", str(storage / "dvc")], cwd=clone, check=True)
    pulled = subprocess.run([*dvc, "pull"], cwd=clone, env=env(), capture_output=True, text=True)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    for out in (f"models/{VARIANT}/ema.pt", f"samples/{VARIANT}", "reports/table2.csv"):
        assert (clone / out).exists(), out
    assert len(variant_runs(tracking.uri)) >= 1


def running_job(cluster: TwoNodes) -> str:
    """The submission id of the one running job."""
    from ray.job_submission import JobStatus

    (job,) = [j for j in job_client(cluster).list_jobs() if j.status == JobStatus.RUNNING]
    return job.submission_id


def stop_job(cluster: TwoNodes, proc: subprocess.Popen) -> None:
    """``ray job stop`` the running job (``proc`` is its ``ray job submit``, which then ends)."""
    subprocess.run(
        [BIN / "ray", "job", "stop", "--address", cluster.dashboard_url, running_job(cluster)],
        env=env(**cluster.client_env), check=True, capture_output=True,
    )  # fmt: skip
    proc.wait(120)
