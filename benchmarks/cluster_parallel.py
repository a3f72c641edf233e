"""Variants side by side on a cluster with fake GPUs: wall time and the share of GPU time in use.

    python -m benchmarks.cluster_parallel                 # 6 variants, 2 fake GPUs
    python -m benchmarks.cluster_parallel --variants 2    # the smallest setting

Needs Linux and root (the simulated two-node cluster of tests/two_node.py: ``ray start --head``
with no GPU, and a second node in its own mount namespace that declares ``--gpus`` fake GPUs and
as many CPUs). The tiny preset is made a GPU preset (``use_gpu`` for training, sampling and the
NLL, ``num_workers: auto``, Inception on ``cuda``: GPU tasks from the CPU head) and the job runs
under ``DDPM_FAKE_GPUS=1`` (pipeline.cluster.devices, test-only: GPU work computes on the CPU,
scheduling is Ray's GPU scheduling). Then, on the same cluster storage path and one MLflow
server address (so that what the stages write can be compared):

1. the parallel job (``cluster.max_parallel_stages: --parallel``, default the fake GPUs),
   ``ray job submit ... -- python -m stages.repro``;
2. its resubmission after an edit (a new working directory restored from storage);
3. the serial job (``max_parallel_stages: 1``), same params otherwise.

It prints and writes (``benchmarks/results/cluster-parallel-<date>.json``, with the load
average) for each job: wall time, the share of declared GPU slot-seconds that held a GPU task
or actor (Ray's task records; an actor holds its GPU from its creation to its last call),
where GPU work ran, the trainings' spans (the parallel run's stage log), the most sample and
NLL blocks in flight, and the stage-by-stage comparison of the two dvc.lock files.
``tests/test_cluster_parallel.py`` (slow) asserts on the same figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(TESTS) not in sys.path:  # the two-node cluster and repo copies are test helpers
    sys.path.insert(0, str(TESTS))

ALL_VARIANTS = (
    "xprev_learned_kl",
    "xprev_fixed_kl",
    "xprev_fixed_mse",
    "eps_learned_kl",
    "eps_fixed_kl",
    "eps_fixed_mse",
)
SPAN = re.compile(r"Stage '([^']+)' exited 0 after [\d.]+ s \(from (.+?) to (.+?) UTC\)")


def gpu_project(dest: Path, variants: list[str], max_parallel: int) -> Path:
    """A copy of the repo at the tiny scale made a GPU preset (one GPU per training)."""
    from repo_copy import copy_repo

    repo = copy_repo(dest, variants=set(variants))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    tiny = params["presets"]["tiny"]
    # evaluation during training (scorer tasks on GPUs) at both checkpoints, steps 4 and 8
    tiny["train"].update(use_gpu=True, num_workers=1, gpus_per_worker=1, eval_every=4)
    tiny["train"].update(eval_samples=4)
    tiny["sample"].update(use_gpu=True, num_workers="auto", gpus_per_worker=1)
    tiny["eval"].update(use_gpu=True, num_workers="auto", inception_device="cuda")
    params["cluster"] = {**(params.get("cluster") or {}), "max_parallel_stages": max_parallel}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo


@dataclass
class Job:
    """One ``ray job submit`` and what Ray and DVC recorded of it."""

    submission_id: str
    returncode: int
    log: str
    wall_s: float
    start_ms: int = 0
    end_ms: int = 0
    tasks: list[Any] = field(default_factory=list)
    actors: list[Any] = field(default_factory=list)
    lock: dict[str, Any] = field(default_factory=dict)


def submit(cluster: Any, repo: Path, env_vars: dict[str, str], submission_id: str) -> Job:
    """``ray job submit`` of ``python -m stages.repro`` (waits); the job's Ray records."""
    from repo_copy import BIN, env

    cmd = [
        BIN / "ray", "job", "submit", "--address", cluster.dashboard_url,
        "--submission-id", submission_id, "--working-dir", str(repo),
        "--runtime-env-json", json.dumps({"env_vars": env_vars}),
        "--", "python", "-m", "stages.repro",
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env(**cluster.client_env), capture_output=True, text=True)
    job = Job(submission_id, done.returncode, done.stdout + done.stderr, 0.0)
    job.wall_s = time.perf_counter() - start
    (repo.parent / f"job-{submission_id}.log").write_text(job.log)  # whole, for a closer look
    _records(cluster, job)
    return job


def _records(cluster: Any, job: Job) -> None:
    """The job's span (Ray's job record) and the tasks and actors created within it.

    Every DVC stage is a Ray driver (a Ray job id) of its own, so tasks are taken by time (one
    submission runs at a time)."""
    from two_node import job_client, state_list

    info = job_client(cluster).get_job_info(job.submission_id)
    job.start_ms, job.end_ms = int(info.start_time or 0), int(info.end_time or 0)
    tasks = state_list(cluster, "tasks", limit=10000, detail=True, timeout=300)
    job.tasks = [
        t for t in tasks if t.creation_time_ms and job.start_ms <= t.creation_time_ms <= job.end_ms
    ]
    ids = {t.actor_id for t in job.tasks if t.actor_id}
    actors = state_list(cluster, "actors", limit=10000, detail=True, timeout=300)
    job.actors = [a for a in actors if a.actor_id in ids]


def holds_gpu(resources: dict[str, float] | None) -> float:
    """GPUs in a task's or actor's required resources (placement-group names included)."""
    return sum(v for k, v in (resources or {}).items() if k == "GPU" or k.startswith("GPU_group"))


def _timed(task: Any) -> bool:
    """Whether Ray recorded the task's start and end (0 or None: not)."""
    return bool(task.start_time_ms) and bool(task.end_time_ms)


def gpu_spans(job: Job) -> list[tuple[str, str, float, float, float]]:
    """(name, node id, start s, end s, GPUs) of every GPU task, and of every GPU actor from its
    creation to its last call's end."""
    out = []
    for t in job.tasks:
        gpus = holds_gpu(t.required_resources)
        if gpus and not t.actor_id and _timed(t):
            out.append((t.name, t.node_id, t.start_time_ms / 1e3, t.end_time_ms / 1e3, gpus))
    for a in job.actors:
        gpus = holds_gpu(a.required_resources)
        calls = [t for t in job.tasks if t.actor_id == a.actor_id and t.start_time_ms]
        if gpus and calls:
            start = min(t.start_time_ms for t in calls) / 1e3
            end = max((t.end_time_ms or t.start_time_ms) for t in calls) / 1e3
            out.append((a.class_name, a.node_id, start, end, gpus))
    return out


def gpu_share(job: Job, declared: int) -> float:
    """GPU-seconds held by tasks and actors over declared GPUs x the job's wall time."""
    held = sum((end - start) * gpus for _, _, start, end, gpus in gpu_spans(job))
    return held / (declared * max(1e-9, (job.end_ms - job.start_ms) / 1e3))


def gpu_work_on(job: Job) -> set[str]:
    """Node ids of every task and actor that asked for a GPU (scheduled ones)."""
    nodes = {t.node_id for t in job.tasks if holds_gpu(t.required_resources) and t.node_id}
    return nodes | {a.node_id for a in job.actors if holds_gpu(a.required_resources) and a.node_id}


def most_in_flight(spans: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def block_spans(job: Job, name: str) -> list[tuple[float, float]]:
    """The (submitted, end) seconds of the job's block tasks of ``name`` (sample_block,
    nll_block): in flight from submission (the window) to the end, waiting for a GPU or not."""
    return [
        (t.creation_time_ms / 1e3, t.end_time_ms / 1e3)
        for t in job.tasks
        if t.name == name and _timed(t) and t.state == "FINISHED"
    ]


def stage_spans(log: str) -> dict[str, tuple[float, float]]:
    """Stage name -> (start, end) epoch seconds, from the parallel run's ``exited`` lines."""

    def epoch(stamp: str) -> float:
        moment = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f")
        return moment.replace(tzinfo=datetime.UTC).timestamp()

    return {m[1]: (epoch(m[2]), epoch(m[3])) for m in SPAN.finditer(log)}


def ran_stages(log: str) -> list[str]:
    return sorted(set(re.findall(r"Running stage '([^']+)'", log)))


# ---------------------------------------------------------------------------------------------
# dvc.lock, stage for stage


def lock_of(storage: Path) -> dict[str, Any]:
    return yaml.safe_load((storage / "state" / "tiny" / "dvc.lock").read_text())["stages"]


def _blob(store: Path, md5: str) -> Path:
    return store / "dvc" / "files" / "md5" / md5[:2] / md5[2:]


def _files(store: Path, md5: str) -> dict[str, str] | None:
    """A directory hash's file list from the storage's DVC remote ({relpath: md5}), or None (an
    uncached output: the remote holds no list)."""
    path = _blob(store, md5)
    if not md5.endswith(".dir") or not path.is_file():
        return None
    return {e["relpath"]: e["md5"] for e in json.loads(path.read_text())}


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two lock entries differ (dotted paths)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += differences(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, f"{where}[{i}]")
        ]
    return [] if a == b else [where]


def _explained(a: dict, b: dict, path: str, par_store: Path, ser_store: Path) -> str:
    """``path`` of a differing md5, with the files that differ where both remotes list the
    directory (a diagnosis: which file to look at)."""
    if not path.endswith(".md5"):
        return path
    node_a, node_b = a, b
    for part in re.findall(r"[^.\[\]]+", path.removesuffix(".md5")):
        key = int(part) if part.isdigit() else part
        node_a, node_b = node_a[key], node_b[key]
    files = _files(par_store, str(node_a["md5"])), _files(ser_store, str(node_b["md5"]))
    if None in files:
        return path
    names = sorted(n for n in set(files[0]) | set(files[1]) if files[0].get(n) != files[1].get(n))
    return f"{path} ({', '.join(names)})"


def compare_locks(
    parallel: dict[str, Any], serial: dict[str, Any], par_store: Path, ser_store: Path
) -> dict[str, Any]:
    """Stage for stage, the entries as DVC wrote them: equal (the same hashes), or where they
    differ (should be none), naming a directory's differing files from the two DVC remotes."""
    same = [s for s in serial if parallel.get(s) == serial[s]]
    differ = {}
    for s in sorted(set(serial) | set(parallel)):
        a, b = parallel.get(s), serial.get(s)
        if a != b:
            paths = differences(a, b) if a and b else ["(missing)"]
            differ[s] = [_explained(a, b, p, par_store, ser_store) for p in paths[:12]]
    return {
        "stages": len(serial),
        "same_order": list(parallel) == list(serial),
        "equal": same,
        "differ": differ,
    }


# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def tracking_at(folder: Path, port: int) -> Iterator[str]:
    """An MLflow server on 127.0.0.1:port (a fresh store in ``folder``)."""
    from two_node import mlflow_server

    with mlflow_server(folder, port=port) as uri:
        yield uri


def summary(job: Job, declared: int, head: set[str]) -> dict[str, Any]:
    trainings = {k: v for k, v in stage_spans(job.log).items() if k.startswith("train@")}
    return {
        "ok": job.returncode == 0 and "succeeded" in job.log,
        "wall_s": round(job.wall_s, 1),
        "ray_job_s": round((job.end_ms - job.start_ms) / 1e3, 1),
        "gpu_slot_share": round(gpu_share(job, declared), 3),
        "gpu_work_on_head": sorted(gpu_work_on(job) & head),
        "gpu_task_count": len(gpu_spans(job)),
        "gpu_kinds": sorted({name for name, *_ in gpu_spans(job)}),
        "trainings_at_once": most_in_flight(list(trainings.values())),
        "training_spans": trainings,
        "sample_blocks_in_flight": most_in_flight(block_spans(job, "sample_block")),
        "nll_blocks_in_flight": most_in_flight(block_spans(job, "nll_block")),
        "gpu_tasks_in_flight": most_in_flight([(s, e) for _, _, s, e, _ in gpu_spans(job)]),
        "stages_ran": len(ran_stages(job.log)),
    }


def failure_excerpt(log: str, size: int = 6000) -> str:
    """What a failed job's log says about the failure: from its last traceback (a stage's, which
    other stages' output running beside it can push far from the end), then the log's end."""
    at = log.rfind("Traceback (most recent call last)")
    if at < 0 or at >= len(log) - size:
        return log[-size:]
    return log[at : at + size // 2] + "\n[...]\n" + log[-size // 2 :]


def run_all(
    workdir: Path, variants: list[str], gpus: int, parallel: int | None = None
) -> dict[str, Any]:
    """The three jobs on a fresh two-node cluster; the figures (see the module docstring)."""
    from repo_copy import free_port
    from two_node import state_list, two_nodes

    parallel = parallel or gpus
    port = free_port()
    results: dict[str, Any] = {"variants": variants, "fake_gpus": gpus, "parallel": parallel}
    results["load_average_before"] = os.getloadavg()
    with two_nodes(node_cpus=gpus, node_gpus=gpus, timeout_s=300) as cluster:
        nodes = state_list(cluster, "nodes", limit=10, detail=True)
        head = {n.node_id for n in nodes if n.is_head_node}
        results["head_gpus"] = sum(n.resources_total.get("GPU", 0) for n in nodes if n.is_head_node)
        storage = cluster.storage / "s"  # the same path for both runs (it is in dvc.lock)
        fake = {"DDPM_FAKE_GPUS": "1", "DDPM_CLUSTER_STORAGE": str(storage)}
        jobs = {}
        repo = gpu_project(workdir / "parallel", variants, parallel)
        with tracking_at(workdir / "mlflow-parallel", port) as uri:
            jobs["parallel"] = submit(cluster, repo, {**fake, "MLFLOW_TRACKING_URI": uri}, "par")
            if jobs["parallel"].returncode:  # nothing to compare: say why at once
                return {**results, "parallel": summary(jobs["parallel"], gpus, head),
                        "log_tail": failure_excerpt(jobs["parallel"].log)}  # fmt: skip
            readme = repo / "README.md"
            readme.write_text(readme.read_text() + "\nresubmitted\n")  # a new working directory
            jobs["resubmitted"] = submit(
                cluster, repo, {**fake, "MLFLOW_TRACKING_URI": uri}, "par-again"
            )
        par_lock = lock_of(storage) if jobs["parallel"].returncode == 0 else {}
        kept = cluster.storage / "parallel"
        storage.rename(kept)
        repo = gpu_project(workdir / "serial", variants, 1)
        with tracking_at(workdir / "mlflow-serial", port) as uri:
            jobs["serial"] = submit(cluster, repo, {**fake, "MLFLOW_TRACKING_URI": uri}, "ser")
        ser_lock = lock_of(storage) if jobs["serial"].returncode == 0 else {}
        for name, job in jobs.items():
            results[name] = summary(job, gpus, head)
            results[name]["log_tail"] = failure_excerpt(job.log) if not results[name]["ok"] else ""
        results["resubmitted"]["ran"] = ran_stages(jobs["resubmitted"].log)
        if par_lock and ser_lock:
            results["locks"] = compare_locks(par_lock, ser_lock, kept, storage)
        for name, store in (("parallel", kept), ("serial", storage)):  # kept for a closer look
            for part in ("state", "dvc"):
                shutil.copytree(store / part, workdir / "stores" / name / part, dirs_exist_ok=True)
        shutil.rmtree(kept, ignore_errors=True)
    results["load_average_after"] = os.getloadavg()
    return results


def main(argv: list[str] | None = None) -> None:
    from benchmarks import results_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=6, help="the first N of the six")
    parser.add_argument("--gpus", type=int, default=2, help="fake GPUs on the second node")
    parser.add_argument("--parallel", type=int, default=None, help="default: --gpus")
    args = parser.parse_args(argv)
    from two_node import can_run

    if can_run() is not None:
        raise SystemExit(f"error: the simulated two-node cluster {can_run()}")
    import tempfile

    before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="ddpm-cluster-parallel-"))
    results = run_all(tmp, list(ALL_VARIANTS[: args.variants]), args.gpus, args.parallel)
    results["load_average"] = {"before": before, "after": os.getloadavg()}
    results["date"] = datetime.date.today().isoformat()
    results["cpus"] = os.cpu_count()
    failed = [n for n in ("parallel", "serial", "resubmitted") if not results.get(n, {}).get("ok")]
    if failed:  # the jobs' whole logs stay for a look; no figures to write
        print(results.get("log_tail") or results[failed[0]].get("log_tail", ""), file=sys.stderr)
        raise SystemExit(
            f"error: the {failed[0]} job failed; its log and projects are kept in {tmp} "
            f"(job-<id>.log)"
        )
    shutil.rmtree(tmp, ignore_errors=True)
    for name in ("parallel", "serial", "resubmitted"):
        r = results[name]
        print(
            f"{name}: ok {r['ok']}, {r['wall_s']} s, GPU slot-seconds in use "
            f"{100 * r['gpu_slot_share']:.0f}%, trainings at once {r['trainings_at_once']}, "
            f"sample blocks in flight {r['sample_blocks_in_flight']}, stages run "
            f"{r['stages_ran']}, GPU work on the head {r['gpu_work_on_head']}"
        )
    print(f"dvc.lock: {results.get('locks')}; load average {results['load_average']}")
    out = results_dir() / f"cluster-parallel-{results['date']}.json"
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
