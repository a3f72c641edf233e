"""The benchmarks run as benchmarks/README.md documents them, and never crash on others' results.

The table tests are in the default suite (milliseconds). Each benchmark's smallest setting runs
in a subprocess with its results redirected to a temporary folder (``DDPM_BENCH_RESULTS``): those
are in the slow suite (each imports torch and diffusers, several start Ray or prepare data).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from repo_copy import write_tree

from benchmarks.table import END, START, table, update_readme

ROOT = Path(__file__).resolve().parents[1]

RUN_RESULT = {
    "date": "2026-01-01",
    "device": "cpu",
    "machine": "test machine",
    "net": "smoke",
    "settings": {"batch": 4, "threads": 1, "bf16": False},
    "rows": [
        {
            "figure": "training images/s",
            "ours": 10.0,
            "diffusers": 20.0,
            "ratio": 0.5,
            "limit": 100.0,
            "projection_hours": 3.0,
            "projection": "800k steps of batch 4",
            "peak_memory_mb": 800.0,
        }
    ],
}


def test_table_skips_other_benchmarks_results(tmp_path: Path) -> None:
    """A results folder with files of other benchmarks (rows but no settings, lists, broken
    JSON) gives the run files' rows; the README's table is rebuilt from them (the KeyError
    'settings' of issue 27)."""
    (tmp_path / "cpu-smoke-2026-01-01.json").write_text(json.dumps(RUN_RESULT))
    (tmp_path / "memory-merge.json").write_text(json.dumps({"benchmark": "m", "rows": [{}]}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{")
    other = dict(RUN_RESULT, settings={"n": 3})
    (tmp_path / "other-settings.json").write_text(json.dumps(other))
    text = table(tmp_path)
    lines = text.splitlines()
    assert len(lines) == 3  # header, separator, one row
    assert "| 2026-01-01 | test machine | smoke | batch 4, 1 thr | training images/s |" in lines[2]
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{START}\nold\n{END}\nafter\n")
    update_readme(readme, tmp_path)
    assert readme.read_text() == f"before\n{START}\n{text}\n{END}\nafter\n"


def test_committed_results_table_builds() -> None:
    """The repository's own results folder (every benchmark's files together) builds a table
    with a row per figure of each benchmarks.run file."""
    results = ROOT / "benchmarks" / "results"
    expected = 0
    for path in results.glob("*.json"):
        r = json.loads(path.read_text())
        if isinstance(r, dict) and "settings" in r and "rows" in r and "net" in r:
            expected += len(r["rows"])
    assert len(table(results).splitlines()) == 2 + expected


def _bench(tmp_path: Path, module: str, *args: str, timeout: int = 900, error: str = "") -> str:
    """Run ``python -m benchmarks.<module> args``; its stdout. With ``error``: expect the one
    ``error:`` line (exit 2) containing it instead of a result."""
    env = {
        **os.environ,
        "DDPM_BENCH_RESULTS": str(tmp_path / "results"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=write_tree(tmp_path / "repo"),  # the project as committed, not the checkout
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if error:  # one line, no traceback
        assert done.returncode == 2 and "error: " in done.stderr and error in done.stderr
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        return done.stdout
    # An uncaught exception exits 1. (Ray's own actors may log tracebacks of theirs, e.g. with
    # other Ray instances on a shared machine: not the benchmark's.)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


SMALLEST = {  # module: the smallest documented setting
    "run": ["--net", "smoke", "--batch", "2", "--steps", "1", "--repeats", "1",
            "--figures", "train,sample,nll"],
    "sampling": ["--net", "smoke", "--threads", "1", "--batch", "2", "--steps", "1"],
    "train_speed": ["--scale", "tiny", "--steps", "4", "--log-every", "2"],
    "stage_step": ["--scale", "tiny", "--steps", "8", "--log-every", "4", "--repeats", "1"],
    "bare_loop": ["--steps", "2", "--samples", "2", "--sample-steps", "2"],
    "prepare_data": ["--records", "8", "--workers", "0"],
    "eval_during_training": ["--scale", "tiny", "--samples", "8"],
    "forward_cpu": ["--nets", "smoke", "--batch", "4", "--repeats", "1", "--calls", "1",
                    "--loop-steps", "2", "--train"],
    "exact_reduction": ["--scale", "tiny", "--seconds", "0.1", "--rounds", "1"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(SMALLEST))
def test_benchmark_smallest_setting(tmp_path: Path, module: str) -> None:
    """Each benchmark of benchmarks/README.md at its smallest setting ends without an error
    (cluster_parallel: tests/test_cluster_parallel.py; side_by_side needs a finished
    `make repro`: its arithmetic and its refusal without one are tested below).
    eval_during_training needs the tiny scale's reference statistics: it runs in the project as
    committed (tests/repo_copy.py), so it must end in one error line naming the stage to run."""
    error = ""
    if module == "eval_during_training":  # it scores against the project's reference
        error = "dvc repro reference"  # statistics, which a committed project does not hold
    _bench(tmp_path, module, *SMALLEST[module], error=error)
    if module == "run":
        files = list((tmp_path / "results").glob("cpu-smoke-*.json"))
        assert len(files) == 1
        assert not json.loads(files[0].read_text())["rows"][0]["errors"]


def test_cluster_parallel_figures_from_records(tmp_path: Path) -> None:
    """benchmarks.cluster_parallel's arithmetic on hand-made records (milliseconds): blocks in
    flight, GPU slot-seconds held by tasks and by actors, stage spans from the log, and the
    dvc.lock comparison that leaves out model.json's MLflow run id only."""
    from types import SimpleNamespace as Rec

    from benchmarks.cluster_parallel import (
        Job,
        compare_locks,
        gpu_share,
        gpu_work_on,
        most_in_flight,
        stage_spans,
    )

    assert most_in_flight([(0, 2), (1, 3), (2.5, 4), (5, 6)]) == 2
    task = dict(actor_id=None, state="FINISHED", node_id="n2")
    tasks = [
        Rec(**task, name="sample_block", required_resources={"CPU": 1, "GPU": 1},
            start_time_ms=1000, end_time_ms=6000),
        Rec(**task, name="prep", required_resources={"CPU": 1}, start_time_ms=1000,
            end_time_ms=11000),
        Rec(**{**task, "actor_id": "a"}, name="w.run", required_resources={},
            start_time_ms=3000, end_time_ms=5000),
        Rec(**{**task, "actor_id": "a"}, name="w.poll", required_resources={},
            start_time_ms=10000, end_time_ms=11000),
    ]  # fmt: skip
    actor = Rec(actor_id="a", class_name="RayTrainWorker", node_id="n2",
                required_resources={"GPU_group_abc": 1.0, "CPU_group_abc": 1.0})  # fmt: skip
    job = Job("s", 0, "", 10.0, 1000, 11000, tasks, [actor])
    assert gpu_share(job, 2) == (5 + 8) / 20  # the task 5 s, the actor from 3 s to 11 s
    assert gpu_work_on(job) == {"n2"}
    log = (
        "Stage 'train@a' exited 0 after 2.0 s (from 2026-12-02 19:00:00.00 to "
        "2026-12-02 19:00:02.00 UTC)\nStage 'train@b' exited 0 after 2.0 s (from "
        "2026-12-02 19:00:01.00 to 2026-12-02 19:00:03.50 UTC)\n"
    )
    spans = stage_spans(log)
    assert most_in_flight(list(spans.values())) == 2 and spans["train@b"][1] - spans["train@b"][
        0
    ] == pytest.approx(2.5)

    def remote(name: str, digest: str, model: dict) -> tuple[Path, dict]:
        """A DVC remote holding one models/ dir (hash ``digest``) and a lock naming it."""
        folder = tmp_path / name / "dvc" / "files" / "md5"
        listing = [{"relpath": "ema.pt", "md5": "c1"}, {"relpath": "model.json", "md5": "bb2"}]
        for path, content in ((digest[:2] + "/" + digest[2:], json.dumps(listing)),
                              ("bb/2", json.dumps(model))):  # fmt: skip
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_text(content)
        lock = {"prepare": {"outs": [{"md5": "e"}]}, "train@a": {"outs": [{"md5": digest}]}}
        return tmp_path / name, lock

    # the same hashes: equal; any difference (a file's content, a run id alike) is one
    par, par_lock = remote("p", "aa1.dir", {"steps": 8})
    ser, ser_lock = remote("s", "aa1.dir", {"steps": 8})
    got = compare_locks(par_lock, ser_lock, par, ser)
    assert got["equal"] == ["prepare", "train@a"] and got["differ"] == {} and got["same_order"]
    other, other_lock = remote("o", "aa4.dir", {"steps": 8, "mlflow_run_id": "y"})
    (other / "dvc/files/md5/aa/4.dir").write_text(
        json.dumps([{"relpath": "ema.pt", "md5": "c1"}, {"relpath": "model.json", "md5": "bb3"}])
    )
    got = compare_locks(par_lock, other_lock, par, other)
    assert got["equal"] == ["prepare"]
    assert got["differ"] == {"train@a": ["outs[0].md5 (model.json)"]}


def test_cluster_parallel_failure_excerpt_keeps_the_stage_traceback() -> None:
    """A failed job's excerpt shows the failing stage's traceback even when the stages running
    beside it wrote far more after it (the tail alone had hidden the cause of a real failure)."""
    from benchmarks.cluster_parallel import failure_excerpt

    trace = "Traceback (most recent call last)\nRestException: RESOURCE_ALREADY_EXISTS\n"
    log = "start\n" * 500 + trace + "other stage\n" * 2000 + "Job failed"
    excerpt = failure_excerpt(log, size=1000)
    assert excerpt.startswith(trace) and excerpt.endswith("Job failed")
    assert failure_excerpt("short log") == "short log"
    assert failure_excerpt("x" * 5000 + trace, size=1000).endswith(trace)  # within the tail


def test_side_by_side_reads_the_stage_times_from_the_repro_output() -> None:
    """benchmarks.side_by_side's arithmetic on a hand-made stages.repro log (milliseconds)."""
    from benchmarks.side_by_side import parse_repro

    log = [
        (12.0, "Running stage 'train@eps_fixed_mse':\n"),
        (20.0, "train eps_fixed_mse: step 100/1000 loss 0.3349 9.00 steps/s 291 img/s ETA 1m\n"),
        (30.0, "train eps_fixed_mse: step 200/1000 loss 0.0829 15.00 steps/s 327 img/s ETA 1m\n"),
        (31.0, "train eps_fixed_mse: step 300/1000 loss 0.0829 16.00 steps/s 327 img/s ETA 1m\n"),
        (80.0, "Running stage 'sample@eps_fixed_mse':\n"),
        (81.0, "stage server: 3 stage(s) forked with the imports done\n"),
        (90.0, "Running stage 'evaluate@eps_fixed_mse':\n"),
        (99.0, "eps_fixed_mse: FID train 62.0, ...; seconds: fid_is 0.1, ray_init 0.0, "
               "nll_and_figures 6.5, total 6.6\n"),
    ]  # fmt: skip
    result = parse_repro(log, 10.0, 101.0)
    assert result["seconds"] == {
        "ray_head": 2.0, "train": 68.0, "sample": 10.0, "evaluate": 11.0,
        "evaluate_bound_and_figures": 6.5, "evaluate_fid_is_part": 4.5,
    }  # fmt: skip
    assert result["train_steps_per_s"] == 18.18  # step 100 to 300 in 11 s: start-up left out
    assert result["train_intervals_steps_per_s"] == [9.0, 15.0, 16.0]
    assert result["stage_server"] == "stage server: 3 stage(s) forked with the imports done"
    assert result["variant_s"] == 82.5


def test_side_by_side_needs_a_finished_repro(tmp_path: Path) -> None:
    """benchmarks.side_by_side in a project without the variant's metrics stops before any
    work with one line naming `make repro`."""
    from benchmarks.side_by_side import main

    with pytest.raises(SystemExit, match=r"^error: run `make repro` in .* first"):
        main(["--root", str(tmp_path), "--rounds", "1"])


def test_side_by_side_counts_only_a_sides_turns_when_interleaved() -> None:
    """With --interleave, a side's seconds are the overlap of its turns with each part; bare's
    parts come from its --marks lines, its steps/s from step 100 to the last step line."""
    from benchmarks.side_by_side import parse_bare, parse_repro

    turns = [(0.0, 2.0), (4.0, 6.0), (8.0, 10.0), (12.0, 14.0)]  # the other side ran between

    def span(a: float, b: float) -> float:
        return sum(max(0.0, min(y, b) - max(x, a)) for x, y in turns)

    ours = [
        (1.0, "Running stage 'train@v':\n"),
        (5.0, "train v: step 100/300 loss 0.3 9.00 steps/s 291 img/s ETA 1m\n"),
        (9.0, "train v: step 300/300 loss 0.1 9.00 steps/s 291 img/s ETA 0s\n"),
        (9.5, "Running stage 'sample@v':\n"),
        (12.5, "Running stage 'evaluate@v':\n"),
        (13.0, "v: FID ...; seconds: fid_is 0.1, nll_and_figures 0.25, total 0.5\n"),
    ]
    result = parse_repro(ours, 0.0, 14.0, span=span)
    assert result["seconds"]["ray_head"] == 1.0
    assert result["seconds"]["train"] == 4.5  # 1-2, 4-6, 8-9.5
    assert result["seconds"]["sample"] == 1.0  # 9.5-10, 12-12.5
    assert result["seconds"]["evaluate"] == 1.5
    assert result["train_steps_per_s"] == 100.0  # 200 steps in 2 active seconds (5-6, 8-9)
    assert result["variant_s"] == 6.75
    bare = [
        (0.5, "bare: train\n"),
        (1.5, "bare: step 100/200\n"),
        (5.5, "bare: step 200/200\n"),
        (5.5, "bare: sample\n"),
        (8.5, "bare: fid_is\n"),
        (9.0, "bare: end\n"),
        (9.0, '{"seconds": {"imports": 3.0, "data": 0.5}, "metrics": {"fid": 1.0}}\n'),
    ]
    result = parse_bare(bare, span=span)
    assert result["seconds"] == {
        "imports_and_data": 3.5, "train": 3.0, "sample": 1.0, "fid_is": 0.5
    }  # fmt: skip
    assert result["train_steps_per_s"] == 50.0  # 100 steps in 2 active seconds
    assert result["variant_s"] == 4.5
    assert result["metrics"] == {"fid": 1.0}


def test_two_commands_take_turns_frozen_by_the_kernel() -> None:
    """benchmarks.timeslice: each side prints its clock every 5 ms; every line it printed came
    within one of its own turns (it did nothing while frozen), the turns of the two never
    overlap, and both exit 0."""
    from benchmarks.timeslice import Side, freezer_root, take_turns

    try:
        freezer_root()
    except RuntimeError as e:
        pytest.skip(str(e))
    code = (
        "import time\nend = time.perf_counter() + {0}\n"
        "while time.perf_counter() < end:\n"
        "    print(time.perf_counter(), flush=True); time.sleep(0.005)\n"
    )
    a = Side("test-a", [sys.executable, "-c", code.format(1.0)], ROOT)
    b = Side("test-b", [sys.executable, "-c", code.format(2.0)], ROOT)
    take_turns([a, b], 0.2)
    assert [a.finish(), b.finish()] == [0, 0]
    for side in (a, b):
        assert side.lines, side.name
        for _, line in side.lines:  # perf_counter is CLOCK_MONOTONIC: one clock for all
            printed = float(line)
            assert side.span(printed - 0.02, printed + 0.02) > 0, (side.name, printed)
    spans = sorted([*a.turns, *b.turns])
    assert all(x[1] <= y[0] + 1e-3 for x, y in itertools.pairwise(spans))
    assert len(a.turns) >= 3 and len(b.turns) >= 5
