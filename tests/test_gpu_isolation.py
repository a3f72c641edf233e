"""One task per GPU, on a local Ray node that declares two fake GPUs (no GPU needed).

The child process owns its Ray instance (the session's shared one declares no GPUs). Each block
task records the ``CUDA_VISIBLE_DEVICES`` Ray gave it, its pid, its time span, and the devices
its worker process saw first (as a CUDA context created by an earlier task would keep them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    import ray
    from pipeline.cluster.blocks import merge_blocks, run_blocks

    def record(start, stop, shared):
        seen = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        first = os.environ.setdefault("DDPM_TEST_FIRST_DEVICES", seen)  # lives with the process
        begin = time.time()
        time.sleep(shared)
        n = stop - start
        return {
            "pid": np.full(n, os.getpid()),
            "begin": np.full(n, begin),
            "end": np.full(n, time.time()),
            "seen": np.array([seen] * n),
            "first": np.array([first] * n),
        }

    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False,
             log_to_driver=False)
    out = sys.argv[1]
    run_blocks(record, 3, 1, out, num_workers="auto", resources={"num_cpus": 1, "num_gpus": 1},
               shared=0.5, desc="blocks")
    merged = merge_blocks(out, 3, 1)
    print(json.dumps({k: v.tolist() for k, v in merged.items()}))
    ray.shutdown()
    """
)


def test_concurrent_gpu_blocks_get_distinct_devices_and_fresh_workers(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "blocks")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rec = json.loads(done.stdout.strip().splitlines()[-1])
    n = len(rec["pid"])
    assert n == 3
    # every task got one of the two fake GPUs, and both were used
    assert all(seen in ("0", "1") for seen in rec["seen"]), rec["seen"]
    assert set(rec["seen"]) == {"0", "1"}
    # a worker never keeps a stale device: each GPU task ran in a fresh process
    assert len(set(rec["pid"])) == n, rec["pid"]
    assert rec["first"] == rec["seen"]
    # tasks running at the same time never share a device
    for i in range(n):
        for j in range(i + 1, n):
            overlap = rec["begin"][i] < rec["end"][j] and rec["begin"][j] < rec["end"][i]
            if overlap:
                assert rec["seen"][i] != rec["seen"][j], (i, j, rec)


# ---------------------------------------------------------------------------------------------
# Every other GPU task: the Inception passes of a CPU driver, the scorer of evaluation during
# training (sample, NLL and figure tasks go through the same gputasks.submit: checked below).

PASSES = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    os.environ["DDPM_FAKE_GPUS"] = "1"  # GPU tasks compute on the CPU (test-only switch)
    import numpy as np, ray, torch, yaml
    from pipeline.cluster import devices, gputasks
    from pipeline.config import config_from_dict
    from pipeline.evaluation import fidelity, inception_task
    from pipeline.evaluation.featurenet import SmallClassifier, classifier_weights, save_classifier
    from pipeline.training.eval_during import CheckpointEvaluator
    from pipeline.training.checkpoint import META, STATE

    calls = []
    original = gputasks.submit
    def spy(fn, *args, resources, **kw):
        calls.append([fn.__name__, dict(resources), type(args[1]).__name__])
        return original(fn, *args, resources=resources, **kw)
    gputasks.submit = inception_task.submit = spy

    def scorer(cfg, variant, step, ema, reference, weights, weights_file):
        time.sleep(0.5)
        return float(os.environ.get("CUDA_VISIBLE_DEVICES", "-1")) + 10 * os.getpid()

    tmp = Path(sys.argv[1])
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["presets"]["tiny"]["eval"].update(inception_device="cuda")
    raw["presets"]["tiny"]["sample"].update(use_gpu=True, gpus_per_worker=1)
    raw["presets"]["tiny"]["train"].update(eval_every=2, eval_samples=2)
    cfg = config_from_dict(raw, "tiny")
    torch.manual_seed(0)
    save_classifier(SmallClassifier(16, 10), tmp / "net.pt")
    weights = classifier_weights(tmp / "net.pt")
    rng = np.random.default_rng(0)
    images, samples = (rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8) for n in (24, 20))

    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False,
             log_to_driver=False)
    assert not torch.cuda.is_available() and devices.inception_needs_gpu_task("cuda")
    t0 = time.time()
    runner = inception_task.InceptionRunner(cfg)
    ref = runner.reference_stats(images, "train", weights, tmp / "cache", tmp / "ref",
                                 is_splits=2)
    fid = runner.fid_is(samples, {"train": ref}, weights, tmp / "cache", 2, bootstrap=4)
    again = runner.fid_is(samples, {"train": ref}, weights, tmp / "cache", 2, bootstrap=4)

    local = fidelity.compute_reference_stats(images, "train", weights, tmp / "local",
                                             tmp / "local-ref", is_splits=2, device="cpu")
    want = fidelity.compute_fid_is(samples, {"train": local}, weights, tmp / "local", 2,
                                   device="cpu", bootstrap=4)
    print(f"remote and local passes: {time.time() - t0:.1f} s", file=sys.stderr)
    a, b = (fidelity.load_reference({"train": p})["train"] for p in (ref, local))
    cached = sorted(p.name.split("-")[0] for p in
                    fidelity.cache_dir(tmp / "cache", weights, "cuda").iterdir())

    run = tmp / "run"  # two checkpoints, steps 2 and 4, scored side by side
    for step in (2, 4):
        folder = run / f"checkpoint_{step:09d}"
        folder.mkdir(parents=True)
        torch.save({"ema": {}}, folder / STATE)
        (folder / META).write_text("{}")
    evaluator = CheckpointEvaluator(cfg, cfg.variant("eps_fixed_mse"), run, ref, tmp,
                                    scorer=scorer, weights=weights)
    scores = [r["fid"] for r in evaluator.finish()]
    print(json.dumps({
        "calls": calls, "fid": fid, "again": again, "want": want, "cached": cached,
        "mu": bool(torch.equal(a["mu"], b["mu"])),
        "sigma": bool(torch.equal(a["sigma"], b["sigma"])),
        "scores": scores,
    }))
    ray.shutdown()
    """
)


@pytest.mark.slow  # 40-300 s: seven fresh Ray workers importing torch, at load average 3-20
def test_inception_passes_and_the_scorer_are_gpu_tasks_on_a_cpu_driver(tmp_path):
    """A driver without CUDA and a preset asking for cuda: the reference statistics and FID/IS
    run as GPU tasks (one fake GPU each), give what a local pass gives, install their cache so a
    rerun ships no image; the scorer of evaluation during training gets a fake GPU and a fresh
    worker per checkpoint."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", PASSES, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rec = json.loads(done.stdout.strip().splitlines()[-1])
    gpu = {"num_cpus": 1, "num_gpus": 1.0}
    names = [(name, shipped) for name, res, shipped in rec["calls"] if name == "_task"]
    assert all(res == gpu for name, res, _ in rec["calls"]), rec["calls"]
    # reference pass and first FID ship image chunks; the rerun finds the cache: a placeholder
    assert names == [("_task", "_Chunks"), ("_task", "_Chunks"), ("_task", "_Placeholder")]
    assert rec["mu"] and rec["sigma"]  # the same statistics as a pass in this process
    assert rec["fid"]["fid_train"] == rec["want"]["fid_train"] == rec["again"]["fid_train"]
    assert rec["fid"]["is_mean"] == rec["want"]["is_mean"]
    # FID's bootstrap error in the task, and from the installed cache on the rerun (issue 26)
    assert rec["fid"]["fid_train_se"] == rec["want"]["fid_train_se"] == rec["again"]["fid_train_se"]
    assert len(set(rec["cached"])) == 2  # both image sets' cache files are on the driver
    # the scorer: two tasks through gputasks.submit, each on a fake GPU, each a fresh worker
    scorers = [c for c in rec["calls"] if c[0] == "scorer"]
    assert len(scorers) == 2
    devices = [round(s % 10) for s in rec["scores"]]
    pids = [s // 10 for s in rec["scores"]]
    assert all(d in (0, 1) for d in devices) and len(set(pids)) == 2, rec["scores"]


def test_every_ray_task_that_can_hold_a_gpu_goes_through_gputasks():
    """Outside pipeline/cluster/gputasks.py, the pipeline submits Ray work only to its progress
    boards (actors of num_cpus=0): a task with GPUs declared anywhere else would bypass the
    fresh-worker rule."""
    import re

    allowed = ("self.board.push.remote(", "ProgressBoard.remote(", "self.board.take.remote(")
    allowed += ("ProgressBoard.options(scheduling_strategy=", "board.remote()")  # new_board
    allowed += ("@ray.remote(num_cpus=0)",)  # the boards' declaration
    found = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        if path.name == "gputasks.py":
            continue
        for line in path.read_text().splitlines():
            calls = re.findall(r"@?[\w.]*\.(?:remote|options)\([^)]*\)?", line)
            found += [c for c in calls if not any(c.startswith(a) for a in allowed)]
    assert found == []


# ---------------------------------------------------------------------------------------------
# The pipeline's own GPU task functions under the test-only fake GPUs (DDPM_FAKE_GPUS=1,
# pipeline.cluster.devices): sample and NLL blocks, Fig. 6's progressive chains, Fig. 7/8's
# chains, each submitted twice as the pipeline submits them (gputasks.submit, one GPU each).

KINDS = textwrap.dedent(
    """
    import json, os, sys, time
    os.environ["DDPM_FAKE_GPUS"] = "1"
    import numpy as np, ray, torch, yaml
    from pathlib import Path
    from pipeline.cluster import gputasks
    from pipeline.config import config_from_dict
    from pipeline.evaluation.likelihood import NllJob, nll_block
    from pipeline.evaluation.reconstruction import FigureSpec, _figure_task
    from pipeline.model.diffusion import linear_beta_schedule
    from pipeline.model.unet import build_unet
    from pipeline.sampling.draw import _progressive_task, sample_block
    from pipeline.sampling.job import SamplingJob

    def probe(fn, *args):
        begin = time.time()
        out = fn(*args)
        return {"name": fn.__name__, "pid": os.getpid(), "begin": begin, "end": time.time(),
                "seen": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "out": out}

    cfg = config_from_dict(yaml.safe_load(Path("params.yaml").read_text()), "tiny")
    torch.manual_seed(0)
    net = build_unet(cfg.model, 8)
    d = cfg.diffusion
    betas = linear_beta_schedule(d.num_timesteps, d.beta_start, d.beta_end)
    job = SamplingJob(dict(net.init_kwargs), net.state_dict(), tuple(float(b) for b in betas),
                      "eps", "fixedlarge", "mse", None, 0, 4, use_gpu=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    spec = FigureSpec(images[:1], (10, 20), 1, images[1:2], images[2:3], 10, 3, 0)
    calls = {
        "sample_block": [(sample_block, 0, 4, job), (sample_block, 4, 8, job)],
        "nll_block": [(nll_block, 0, 4, NllJob(job, images, "test"))] * 2,
        "_progressive_task": [(_progressive_task, job, [0, 1], 4)] * 2,
        "_figure_task": [(_figure_task, job, spec)] * 2,
    }
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False,
             log_to_driver=False)
    refs = [gputasks.submit(probe, *c, resources={"num_cpus": 1, "num_gpus": 1})
            for kind in calls.values() for c in kind]
    records = ray.get(refs)
    # the same functions on the CPU in this process (no GPU asked for)
    cpu = __import__("dataclasses").replace(job, use_gpu=False)
    local = [sample_block(0, 4, cpu), nll_block(0, 4, NllJob(cpu, images, "test")),
             _progressive_task(cpu, [0, 1], 4), _figure_task(cpu, spec)]
    remote = [records[0]["out"], records[2]["out"], records[4]["out"], records[6]["out"]]
    equal = [all(np.array_equal(a[k], b[k]) for k in a) and set(a) == set(b)
             for a, b in zip(local, remote)]
    # a GPU task that Ray gave no GPU stops (fake or real)
    try:
        ray.get(gputasks.submit(sample_block, 0, 4, job, resources={"num_cpus": 1}))
        refused = ""
    except ray.exceptions.RayTaskError as e:
        refused = str(e)
    for r in records:
        r.pop("out")
    print(json.dumps({"records": records, "equal": equal, "refused": refused[-300:]}))
    ray.shutdown()
    """
)


@pytest.mark.slow  # 60-300 s: nine fresh Ray workers importing torch on the loaded VM
def test_every_gpu_task_kind_runs_on_a_fake_gpu_in_a_fresh_worker(tmp_path):
    """Sample and NLL blocks, Fig. 6's and Fig. 7/8's chains, as GPU tasks on a node with two
    fake GPUs: each holds one fake GPU, runs in a fresh worker, never shares its device with a
    task running at the same time, and computes exactly what the same function computes on
    the CPU in the driver; a GPU task that Ray gave no GPU stops."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", KINDS], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rec = json.loads(done.stdout.strip().splitlines()[-1])
    records = rec["records"]
    kinds = [r["name"] for r in records]
    assert (
        kinds
        == ["sample_block"] * 2
        + ["nll_block"] * 2
        + ["_progressive_task"] * 2
        + ["_figure_task"] * 2
    )
    assert all(r["seen"] in ("0", "1") for r in records), records
    assert len({r["pid"] for r in records}) == len(records)  # a fresh worker per GPU task
    for i, a in enumerate(records):
        for b in records[i + 1 :]:
            if a["begin"] < b["end"] and b["begin"] < a["end"]:
                assert a["seen"] != b["seen"], (a, b)
    assert rec["equal"] == [True] * 4  # fake GPU = the CPU computation, bit for bit
    assert "gave this task no (fake) GPU" in rec["refused"]
