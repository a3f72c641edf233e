"""The tiny preset end to end: dvc repro in a copy of the repo (the Ray job: test_two_node.py).

Real components only: DVC, a private Ray head started by ``ray start --head``, Ray Train,
torch-fidelity (stand-in weights). Every variant must reach MLflow with its metrics, and the
report must write the three tables. The same as ``ray job submit`` on a two-node cluster with
a real ``mlflow server`` is tests/test_two_node.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest
from repo_copy import BIN, PARAMS, copy_repo, env

from pipeline.config import load_config

METRICS = ("fid_train", "fid_test", "is_mean", "is_std", "nll_bpd")
ALL_VARIANTS = set(load_config(PARAMS, "tiny").variants)
# Two of the six: between them both means (xprev, eps), both variances (learned, fixed) and both
# losses (kl, mse), the paths in which the variants differ; the other four combine the same code
# (all six run in `make repro`, and three side by side in test_cluster_parallel.py, slow). Each
# further variant cost ~50 s of CI here (three stages of the tiny preset and their restarts).
E2E_VARIANTS = {"xprev_learned_kl", "eps_fixed_mse"}


def ray_sessions() -> set[Path]:
    """Session folders of local clusters started with Ray's default temp dir."""
    return set(Path("/tmp/ray").glob("session_2*"))


def head_processes(known: set[Path]) -> list[psutil.Process]:
    """Processes of private Ray heads (``/tmp/ddpm-ray-*`` on the command line) not in ``known``."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        args = [a for a in p.info["cmdline"] or () if "/tmp/ddpm-ray-" in a]
        if args and not any(str(k) in a for k in known for a in args):
            found.append(p)
    return found


def variant_runs(tracking_uri: str) -> pd.DataFrame:
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=["ddpm-repro"])
    return runs[runs["tags.ddpm.variant"].notna()].set_index("tags.ddpm.variant")


def check_results(
    runs: pd.DataFrame, tables: dict[str, pd.DataFrame], variants: set[str] = ALL_VARIANTS
) -> None:
    """Every variant run has its metrics in MLflow; the tables show them beside the paper's."""
    assert set(runs.index) == variants
    for metric in METRICS:
        assert runs[f"metrics.{metric}"].notna().all(), metric
    assert (runs["tags.stand_in"] == "true").all()
    # Ranges that a broken stage would leave: FID of samples against real images is positive,
    # IS lies in [1, classes] (1008 logits), and the bound is its prior term L_T plus positive
    # terms L_{t-1} and L_0. (Below 8 bits/dim it is not after the tiny preset's 8 steps: 27-63.)
    assert (runs["metrics.fid_train"] > 0).all() and (runs["metrics.fid_test"] > 0).all()
    assert runs["metrics.is_mean"].between(1.0 - 1e-9, 1008.0).all()  # 1e-9: float rounding
    for term in ("metrics.nll_prior_bpd", "metrics.nll_decoder_bpd"):  # L_T and L_0
        assert (runs["metrics.nll_bpd"] > runs[term]).all(), term
    assert (runs["metrics.nll_prior_bpd"] > 0).all()
    t2 = tables["table2"]
    real = t2[t2["mean"] == "real data"]  # real test images against train, same extractor
    assert len(real) == 1 and real["FID ours"].notna().all() and real["IS ours"].notna().all()
    t2 = t2[t2["mean"] != "real data"].set_index("variant")
    # samples of 8 training steps are further from the train images than real test images are
    assert (runs["metrics.fid_train"] > real["FID ours"].iloc[0]).all()
    assert set(t2.index) == ALL_VARIANTS  # Table 2 has every row; variants not run say so
    assert all("not run" in t2.loc[name, "note"] for name in ALL_VARIANTS - variants)
    for name in variants:
        assert t2.loc[name, "FID ours"] == pytest.approx(runs.loc[name, "metrics.fid_train"])
    assert len(tables["table1"]) == 3 and len(tables["table4"]) == 2  # 2 rows and real data


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` that still run (not zombies)."""
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def interrupt_repro(repo: Path, sig: signal.Signals, stage: str, log: Path) -> str:
    """Start what `make repro` runs, send ``sig`` to it while ``stages.<stage>`` runs.

    Checks the stop: exit status 128 + sig, and no process of the run left (dvc, the stage, the
    private Ray head and its workers). Returns the variant the stopped stage was working on.
    """
    with log.open("w") as out:
        proc = subprocess.Popen(
            [BIN / "python", "-m", "stages.repro", "--local-ray"], cwd=repo, env=env(),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 900
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"stages.{stage} never started"
            tree = psutil.Process(proc.pid).children(recursive=True)
            found = [p for p in tree if f"stages.{stage}" in cmdline(p)]  # not train_reference
            if found and any(handles_termination(p.pid) for p in stage_processes(tree, found)):
                break  # the stage's main() runs: its SIGTERM/SIGHUP handler is installed
            time.sleep(0.2)
        tree = [p for p in psutil.Process(proc.pid).children(recursive=True) if cmdline(p)]
        programs = {Path(cmdline(p)[1]).name for p in tree if len(cmdline(p)) > 1}
        (variant,) = {c[-1] for c in map(cmdline, found) if c[-2:-1] == ["--variant"]}
        proc.send_signal(sig)  # to the driver only, as `kill PID` does: it must reach the rest
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 128 + sig, log.read_text()[-3000:]
    assert {"dvc", "ray"} <= programs  # dvc repro and the private Ray head were running
    deadline = time.monotonic() + 60  # a bound only (a loaded 2-core VM): no wait when gone
    while alive(tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(tree), [cmdline(p)[:3] for p in alive(tree)]
    return variant


def stage_processes(tree: list[psutil.Process], found: list[psutil.Process]) -> list:
    """The processes that run the stage: those DVC started (``found``), or, where the run's
    stage server (pipeline.forkserver) forked them, its children. A process DVC started that
    the server serves catches SIGTERM only to forward it, and only once the child exists."""
    children = []
    for server in (p for p in tree if "pipeline.forkserver" in " ".join(cmdline(p))):
        with contextlib.suppress(psutil.Error):
            children += alive(server.children())
    return children or found


def running(log: Path | str) -> list[str]:
    """The stages DVC started, in order, from a log file or text ("Running stage 'NAME':")."""
    text = log.read_text() if isinstance(log, Path) else log
    return [line.split("'")[1] for line in text.splitlines() if line.startswith("Running stage '")]


def handles_termination(pid: int) -> bool:
    """Whether process ``pid`` catches SIGTERM (pipeline.cli.entry_point's handler: the stage
    is past its imports and inside main()), from /proc/<pid>/status SigCgt."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(
        (line.split()[1] for line in status.splitlines() if line.startswith("SigCgt")), "0"
    )
    return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


def stage_outputs(repo: Path, stage: str, variant: str) -> list[Path]:
    """Every output dvc.yaml gives stage ``stage@variant`` (outs, metrics, plots), except the
    ``persist`` ones (checkpoints, finished blocks: kept on purpose for the resume)."""
    import yaml

    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]["do"]
    paths = []
    for section in ("outs", "metrics", "plots"):
        for entry in spec.get(section, []):
            name, opts = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
            if not (opts or {}).get("persist"):
                paths.append(repo / name.replace("${key}", variant))
    return paths


def temporaries(repo: Path) -> list[Path]:
    """Temporary siblings (pipeline.atomic's ``.<name>.*.tmp*``, storage's ``*.tmp``) anywhere in
    the project outside DVC's own folder."""
    return [
        p for p in repo.rglob("*")
        if ".dvc" not in p.relative_to(repo).parts[:1] and ".tmp" in p.name
    ]  # fmt: skip


def check_stop(repo: Path, stage: str, variant: str) -> None:
    """The stopped stage@variant left none of its outputs, and nothing temporary is left; the
    other variants' outputs of that stage are all there or all absent."""
    missing = [p for p in stage_outputs(repo, stage, variant) if p.exists()]
    assert not missing, f"{stage}@{variant} was stopped but left {missing}"
    assert not temporaries(repo), temporaries(repo)
    assert stopped_before_all(repo, lambda v: stage_outputs(repo, stage, v))


def cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


@pytest.mark.e2e
def test_make_repro_path_tiny_in_a_copy_of_the_repo(tmp_path):
    """What `make repro` runs (dvc repro, every stage on one local Ray head), two variants.

    Stopped by SIGTERM during a training, by SIGHUP (a closed terminal) during sampling and by
    Ctrl-C (SIGINT) during an evaluation, each once its stage is inside main(): each stop leaves
    no process, none of the stopped stage's outputs (every one dvc.yaml names) and no temporary
    file anywhere; the last run skips every stage finished before and finishes what they left,
    with everything a clean run gives.
    """
    repo = copy_repo(tmp_path / "repo", variants=E2E_VARIANTS)
    sessions, heads = ray_sessions(), set(Path("/tmp").glob("ddpm-ray-*"))
    stopped = []
    for sig, stage in ((signal.SIGTERM, "train"), (signal.SIGHUP, "sample"),
                       (signal.SIGINT, "evaluate")):  # fmt: skip
        variant = interrupt_repro(repo, sig, stage, tmp_path / f"{sig.name}.log")
        check_stop(repo, stage, variant)
        stopped.append(f"{stage}@{variant}")
    finished = set()  # every stage that ran to its end in the stopped runs (not the last one)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        finished |= set(running(tmp_path / f"{sig.name}.log")[:-1])
    run = subprocess.run(
        [BIN / "python", "-m", "stages.repro", "--local-ray"],
        cwd=repo, env=env(), capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ran = set(running(run.stdout))
    skipped = {line.split("'")[1] for line in run.stdout.splitlines() if "didn't change" in line}
    assert {"prepare", "featurenet", "reference"} <= finished
    assert finished <= skipped and not finished & ran, (sorted(ran), run.stdout[-3000:])
    assert set(stopped) <= finished | ran  # each stopped stage was finished by a later run
    # the stages ran in children of the run's stage server, none by itself for a refusal
    server = re.search(r"stage server: (\d+) stage\(s\) forked.*", run.stderr)
    assert server and int(server.group(1)) >= 1 and "ran themselves" not in server.group(0)
    assert ray_sessions() == sessions  # every stage joined the private head: no local clusters
    assert set(Path("/tmp").glob("ddpm-ray-*")) == heads  # and the head is gone
    assert not head_processes(heads)  # none of its processes is left
    tables = {t: pd.read_csv(repo / "reports" / f"{t}.csv") for t in ("table1", "table2", "table4")}
    check_results(variant_runs(f"sqlite:///{repo / 'mlflow.db'}"), tables, E2E_VARIANTS)
    for t in tables:
        assert (repo / "reports" / f"{t}.md").read_text().count("stand-in") >= 1
    shown = subprocess.run(
        ["dvc", "metrics", "show", "--json"], cwd=repo, env=env(), capture_output=True, text=True
    )
    metrics = next(iter(json.loads(shown.stdout).values()))["data"]
    assert len(metrics) == len(E2E_VARIANTS) and all(
        m["data"]["stand_in"] is True for m in metrics.values()
    )
    again = subprocess.run(["dvc", "status"], cwd=repo, env=env(), capture_output=True, text=True)
    assert "up to date" in again.stdout  # a second repro would do nothing
    check_samples_on_disk_once(repo, tmp_path)


def stopped_before_all(repo: Path, outputs) -> bool:
    """The stop left every variant's stage outputs (``outputs(variant)``) all there or none,
    and at least one variant without them: the stage that was stopped wrote nothing.

    (Which variant's stage the signal lands in depends on timing: in CI a stage that had just
    started once finished before the stop reached the run, and the next one was stopped.)
    """
    states = {v: {p.exists() for p in outputs(v)} for v in E2E_VARIANTS}
    assert all(len(s) == 1 for s in states.values()), states  # no partial output
    return any(s == {False} for s in states.values())


def check_samples_on_disk_once(repo: Path, tmp_path: Path) -> None:
    """Each sample shard in samples/<V>/ is DVC's cache object itself, not a copy: a hard link
    of one inode (.dvc/config: cache.type reflink,hardlink,copy); with DVC's default copy type
    this fails. (The block in work/ stays a separate file: docs/sampling.md, Disk.) Where
    the filesystem has reflinks DVC uses those instead (shared extents, separate inodes)."""
    probe = tmp_path / "reflink-probe"
    probe.write_bytes(b"x")
    reflink = subprocess.run(["cp", "--reflink=always", probe, f"{probe}.2"], capture_output=True)
    if reflink.returncode == 0:
        return
    shards = sorted((repo / "samples").glob("*/block-*.npz"))
    assert len(shards) >= 2 * len(E2E_VARIANTS)  # 16 samples in blocks of 8
    cache = {p.stat().st_ino for p in (repo / ".dvc" / "cache").rglob("*") if p.is_file()}
    for shard in shards:
        assert shard.stat().st_ino in cache and shard.stat().st_nlink >= 2, shard
