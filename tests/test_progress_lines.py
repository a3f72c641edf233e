"""A terminal that says what it is doing: progress lines name stage, variant and pass; evaluation
during training reports each scoring and the wait; Ray Train's SIGINT handler does not outlive
fit; evaluation during training samples with the sample stage's sampler."""

from __future__ import annotations

import dataclasses
import io
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_project import VARIANT, tiny_config

from pipeline import cli
from pipeline.cluster.taskprogress import BlockProgress
from pipeline.model.respace import RespacedDiffusion
from pipeline.model.unet import build_unet
from pipeline.training import eval_during
from pipeline.training.signals import own_sigint


def _stage(module: str, body):
    body.__module__ = module
    return cli.entry_point(body)


def test_progress_lines_name_stage_variant_and_pass():
    out = io.StringIO()

    def main(argv):
        bar = BlockProgress(4, 0, "bound, test images", unit="images", stream=out)
        bar.advance(4)
        bar.close()

    _stage("stages.evaluate", main)(["--variant", "eps_fixed_mse"])
    line = out.getvalue().strip()
    assert line.startswith("evaluate eps_fixed_mse: bound, test images: 4/4 (100.0%)"), line
    assert "images/s" in line  # the rate's unit is still the item, not the label

    def other(argv):
        BlockProgress(2, 0, "samples", stream=out).advance(2)

    out.truncate(0), out.seek(0)
    _stage("stages.sample", other)(["--variant=xprev_fixed_kl", "--params", "p.yaml"])
    assert out.getvalue().startswith("sample xprev_fixed_kl: samples: 2/2"), out.getvalue()


def test_a_stage_run_as_python_dash_m(monkeypatch):
    """``python -m stages.evaluate``: main's module is __main__, its spec names the stage."""
    import types

    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "__spec__", types.SimpleNamespace(name="stages.evaluate"))
    fn = _stage("__main__", lambda argv: cli.stage_label())
    assert fn(["--variant", "eps_fixed_kl"]) == "evaluate eps_fixed_kl"


def test_a_stage_without_variant_and_code_outside_stages():
    assert cli._label(lambda: None, []) is None  # not a stage: lines keep their bare name
    fn = _stage("stages.reference", lambda argv: cli.stage_label())
    assert fn([]) == "reference"
    assert cli.stage_label() is None  # only while the stage's main runs


def test_ray_trains_sigint_handler_does_not_outlive_fit():
    """The handler Ray Train v2's fit installs (its real code) is gone after the block."""
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    before = signal.getsignal(signal.SIGINT)
    with own_sigint():
        DataParallelTrainer._register_sigint_handler(None, controller=None)
        inside = signal.getsignal(signal.SIGINT)
        assert inside is not before and inside.__qualname__.endswith("sigint_handler")
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(RuntimeError), own_sigint():  # also when fit raises
        DataParallelTrainer._register_sigint_handler(None, controller=None)
        raise RuntimeError("training failed")
    assert signal.getsignal(signal.SIGINT) is before


def _fake_sampling(monkeypatch, seen: dict):
    import pipeline.evaluation.fidelity as fidelity
    import pipeline.sampling.draw as draw

    def sample_images(net, diffusion, indices, *args, **kwargs):
        seen["diffusion"] = diffusion
        return np.zeros((len(indices), 8, 8, 3), np.uint8)

    monkeypatch.setattr(draw, "sample_images", sample_images)
    monkeypatch.setattr(fidelity, "compute_fid_is", lambda *a, **k: {"fid_train": 4.5})


@pytest.mark.parametrize("steps", [None, 5])
def test_evaluation_during_training_uses_the_sample_stages_sampler(monkeypatch, steps):
    cfg = tiny_config(eval_every=4, eval_samples=2)
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, steps=steps))
    variant = cfg.variant(VARIANT)
    torch.manual_seed(0)
    ema = build_unet(cfg.model, cfg.data.resolution, 3).state_dict()
    seen: dict = {}
    _fake_sampling(monkeypatch, seen)
    weights = eval_during.InceptionWeights(None, "none", stand_in=True)
    fid = eval_during.score_checkpoint(cfg, variant, 4, ema, b"stats", weights, None)
    assert fid == 4.5
    T = cfg.diffusion.num_timesteps
    if steps is None:
        assert not isinstance(seen["diffusion"], RespacedDiffusion)
        assert seen["diffusion"].num_timesteps == T
        assert eval_during.eval_sampler(cfg) == f"Algorithm 2, {T} steps"
    else:  # as the sample stage: respaced to sample.steps
        assert isinstance(seen["diffusion"], RespacedDiffusion)
        assert seen["diffusion"].num_timesteps == steps
        assert f"{steps} of {T} steps" in eval_during.eval_sampler(cfg)


def test_evaluation_during_training_says_each_scoring_and_the_wait(tmp_path, capsys, monkeypatch):
    """Started, finished (FID), and the wait for pending ones, each a line naming the variant."""
    from pipeline.training import checkpoint
    from pipeline.training.checkpoint import META, STATE

    cfg = tiny_config(eval_every=4, eval_samples=2)
    run = tmp_path / "run"
    for step in (4, 8):
        folder = run / f"checkpoint_{step:06d}"
        folder.mkdir(parents=True)
        (folder / STATE).write_bytes(b"")
        (folder / META).write_text("{}")
    (tmp_path / "ref.pt").write_bytes(b"stats")
    fids = {4: 7.25, 8: 3.5}
    evaluator = eval_during.CheckpointEvaluator(
        cfg, cfg.variant(VARIANT), run, tmp_path / "ref.pt", tmp_path,
        scorer=lambda cfg, variant, step, *rest: fids[step], run_task=False,
        weights=eval_during.InceptionWeights(None, "none", stand_in=True),
    )  # fmt: skip
    monkeypatch.setattr(checkpoint, "read_checkpoint", lambda folder: {"ema": {}})
    records = evaluator.finish()
    assert [r["fid"] for r in records] == [7.25, 3.5]
    err = capsys.readouterr().err.splitlines()
    name = f"train {VARIANT}: "
    assert all(line.startswith(name) for line in err), err
    text = "\n".join(err)
    assert "evaluating the checkpoint of step 4: FID of 2 samples (Algorithm 2, 20 steps)" in text
    assert "waiting for 2 evaluation(s) of step(s) 4, 8" in text
    assert "checkpoint of step 4: FID 7.250" in text and "checkpoint of step 8: FID 3.500" in text


def test_ray_trains_forced_exit_is_an_interrupt_not_exit_0():
    with pytest.raises(KeyboardInterrupt), own_sigint():
        sys.exit(0)  # what Ray Train's handler does on the third Ctrl-C
    with pytest.raises(SystemExit) as stop, own_sigint():
        raise cli.Terminated(143)
    assert stop.value.code == 143


STOPPED_STAGE = """
import atexit, os, signal, sys, time
from pipeline.cli import entry_point, run_stage

def late_signal():  # as stages/repro.py resends the stop signal while the stage exits
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    print("exit handler done", file=sys.stderr)

atexit.register(late_signal)

@entry_point
def main(argv=None):
    raise KeyboardInterrupt

run_stage(main)
"""


def test_a_signal_during_a_stopped_stages_exit_prints_no_traceback(tmp_path):
    import os
    import subprocess

    script = tmp_path / "stage.py"
    script.write_text(STOPPED_STAGE)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 130, done.stderr
    assert "interrupted: finished work is kept" in done.stderr
    assert "exit handler done" in done.stderr  # the handler ran to its end
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
