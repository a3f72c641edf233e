"""The evaluate stage end to end at the tiny scale, and its one-line errors.

One temporary project runs the real stages in this process (sharing the session's Ray): data
from ``prepare``, a model in the train stage's format with its MLflow run, ``sample``,
``reference`` (stand-in Inception, 16 train images), ``evaluate`` and ``report``. FID against
the train split only (as the LSUN presets do): each 2048-d Fréchet distance costs ~5-8 s here,
and both splits run in the slow ``dvc repro`` test. Every test below reads these outputs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from eval_project import ROOT, VARIANT, make_model, make_project, write_samples
from inception_score import inception_score
from PIL import Image

from pipeline.config import STAND_IN_NOTE, load_config
from pipeline.report import tables

FIGURES = {"reconstructions.png", "interpolation.png", "rate_distortion.png"}


def run_main(module, capsys, *argv: str) -> tuple[int, str, str]:
    """``module.main(argv)`` as the CLI runs it: (exit code, stdout, stderr)."""
    try:
        module.main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def project(ray_session, tmp_path_factory):
    from pipeline.report.tracking import TAG_RUN, start_variant_run
    from stages import evaluate, reference, report, sample

    root = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.delenv("DDPM_PARAMS", raising=False)
        cfg = make_project(root, ref_images=16, fid_against=["train"])
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["variants"] = {VARIANT: params["variants"][VARIANT]}  # the report's one row
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        # as the train stage leaves it: model.json names the run, the MLflow run has the tag
        tags = {TAG_RUN: f"{VARIANT}-r"}
        run_id = start_variant_run(load_config(), cfg.variant(VARIANT), tags=tags)
        make_model(root, run_name=f"{VARIANT}-r")
        outputs = {}
        for name, module, argv in [
            ("sample", sample, ["--variant", VARIANT]),
            ("reference", reference, []),
            ("evaluate", evaluate, ["--variant", VARIANT]),
            ("report", report, []),
        ]:
            try:
                module.main(argv)
            except SystemExit as e:
                raise AssertionError(f"stage {name} exited with {e.code}") from None
        outputs["cfg"] = load_config()
        yield types.SimpleNamespace(root=root, run_id=run_id, **outputs)


def read_metrics(project) -> dict:
    return json.loads((project.root / "metrics" / f"{VARIANT}.json").read_text())


def test_metrics_json(project):
    m = read_metrics(project)
    for key in ("fid_train", "is_mean", "is_std", "nll_bpd"):
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    assert m["fid_train"] > 0 and m["fid_test"] is None
    # IS from the logits that the samples' Inception pass cached, computed here in numpy
    (logits,) = (project.root / "work" / "fid" / VARIANT).rglob("*-features-logits_unbiased.pt")
    logits = torch.load(logits, weights_only=True).double().numpy()
    assert logits.shape == (16, 1008)
    expected = inception_score(logits, project.cfg.eval.is_splits)
    assert (m["is_mean"], m["is_std"]) == pytest.approx(expected, rel=1e-9)
    assert (m["n_samples"], m["nll_images"], m["nll_train_images"]) == (16, 8, 0)
    assert m["nll_train_bpd"] is None and m["nll_train_bpd_se"] is None
    # the errors: FID's bootstrap over the 16 samples' features, the NLL's over the 8 images
    assert m["fid_train_se"] > 0 and m["fid_bootstrap"] == project.cfg.eval.fid_bootstrap
    assert 0 < m["nll_bpd_se"] < m["nll_bpd"] and m["is_splits"] == project.cfg.eval.is_splits
    assert m["stand_in"] is True and m["stand_in_note"] == STAND_IN_NOTE
    assert set(m["stand_in_reasons"]) == {"synthetic data", "stand-in Inception weights"}
    assert set(m["table4"]) == {"20", "10"}
    # after all T = 20 steps the rate is the bound minus the decoder term L_0
    rate_all = m["table4"]["20"]["rate_bpd"]
    assert rate_all == pytest.approx(m["nll_bpd"] - m["nll_decoder_bpd"], rel=1e-9)
    assert m["table4"]["10"]["rate_bpd"] < rate_all
    for row in m["table4"].values():  # Table 4's errors over the 8 test images
        assert min(row["rate_bpd_se"], row["rmse_se"], row["rmse_per_image_se"]) > 0


def test_mlflow_run_has_the_reports_metrics_tags_and_artifacts(project):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project.root / 'mlflow.db'}")
    run = mlflow.get_run(project.run_id)
    m, logged = read_metrics(project), run.data.metrics
    for name in tables.METRICS:
        if m[name] is None:
            assert name not in logged
        else:
            assert logged[name] == pytest.approx(m[name], rel=1e-12), name
    for n in project.cfg.eval.rd_steps:
        assert logged[tables.rd_metric("rate_bpd", n)] == m["table4"][str(n)]["rate_bpd"]
        assert logged[tables.rd_metric("rmse", n)] == m["table4"][str(n)]["rmse"]
        assert logged[tables.rd_metric("rate_bpd_se", n)] == m["table4"][str(n)]["rate_bpd_se"]
    assert logged["eval_total_s"] > 0
    assert run.data.tags["stand_in"] == "true"
    assert "stand-in Inception weights" in run.data.tags["stand_in_reason"]
    client = mlflow.MlflowClient()
    history = client.get_metric_history(project.run_id, "rd_curve_rmse")
    assert sorted(h.step for h in history) == list(range(1, 21))
    paths = {a.path for d in ("figures", "plots", "metrics") for a in client.list_artifacts(
        project.run_id, d)}  # fmt: skip
    expected = {f"figures/{f}" for f in FIGURES}
    expected |= {"plots/rate_distortion.csv", f"metrics/{VARIANT}.json"}
    assert expected <= paths


def test_plots_csv_is_the_curve(project):
    with (project.root / "plots" / VARIANT / "rate_distortion.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["t", "steps", "T_minus_t", "rate_bpd", "distortion_rmse",
                             "distortion_rmse_per_image", "vb_bpd", "xstart_mse",
                             "eps_mse"]  # fmt: skip
    assert [int(r["T_minus_t"]) for r in rows] == list(range(19, -1, -1))
    assert [int(r["t"]) for r in rows] == list(range(1, 21))
    assert [int(r["steps"]) for r in rows] == list(range(20, 0, -1))
    table4 = read_metrics(project)["table4"]
    for r in rows:
        if r["steps"] in table4:
            assert float(r["rate_bpd"]) == pytest.approx(table4[r["steps"]]["rate_bpd"], 1e-9)
            assert float(r["distortion_rmse"]) == pytest.approx(table4[r["steps"]]["rmse"], 1e-9)
            per_image = table4[r["steps"]]["rmse_per_image"]
            assert float(r["distortion_rmse_per_image"]) == pytest.approx(per_image, 1e-9)
    rate = np.array([float(r["rate_bpd"]) for r in rows])
    assert np.all(np.diff(rate) <= 0)  # more reverse steps, more bits received


def test_figures_are_pngs(project):
    folder = project.root / "figures" / VARIANT
    assert {p.name for p in folder.iterdir()} == FIGURES
    for name in FIGURES:
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and image.width >= 200


def test_report_reads_the_evaluation(project):
    text = (project.root / "reports" / "table1.md").read_text()
    assert STAND_IN_NOTE in text
    with (project.root / "reports" / "table1.csv").open() as f:
        row = next(r for r in csv.DictReader(f) if r["variant"] == VARIANT)
    assert float(row["NLL test bpd ours"]) == pytest.approx(read_metrics(project)["nll_bpd"])
    assert float(row["FID train ours"]) == pytest.approx(read_metrics(project)["fid_train"])


def test_work_folders_hold_the_resumable_parts(project):
    nll = project.root / "work" / "nll" / VARIANT
    assert len(list(nll.glob("test-*/block-*.npz"))) == 2  # 8 images in blocks of 4
    assert len(list(nll.glob("figures-*.npz"))) == 1
    assert any((project.root / "work" / "fid" / VARIANT).rglob("*stat-fid-2048.pt"))


def test_without_the_bound_the_curve_outputs_are_skipped(project, tmp_path):
    """eval.nll_images: 0 (the LSUN presets): no NLL, no Table 4, a header-only plots file."""
    from pipeline.evaluation.evaluate import Evaluation, metrics_json
    from pipeline.evaluation.outputs import CSV_COLUMNS, write_outputs

    cfg = project.cfg
    result = Evaluation(VARIANT, {}, {"stand_in": False, "stand_in_reasons": []})
    fid = {"fid_train": 3.0, "fid_test": None, "is_mean": 9.0, "is_std": 0.1, "n_samples": 16}
    result.metrics = metrics_json(cfg, cfg.variant(VARIANT), fid, result, {})
    write_outputs(cfg, result, tmp_path)
    m = json.loads((tmp_path / "metrics" / f"{VARIANT}.json").read_text())
    assert (m["nll_bpd"], m["nll_train_bpd"], m["nll_images"]) == (None, None, 0)
    assert "table4" not in m and m["stand_in"] is False and "stand_in_note" not in m
    text = (tmp_path / "plots" / VARIANT / "rate_distortion.csv").read_text()
    assert text.strip() == ",".join(CSV_COLUMNS)
    assert list((tmp_path / "figures" / VARIANT).iterdir()) == []


def test_evaluate_stage_stopped_by_sigterm_leaves_no_output_and_reruns(project, tmp_path):
    """The evaluate stage alone (its own local Ray), SIGTERM after its Inception pass: exit 143,
    no metrics, plots or figures of the variant; the rerun gives the whole evaluation."""
    root = tmp_path / "copy"
    shutil.copytree(project.root, root, ignore=shutil.ignore_patterns("__pycache__"))
    for out in ("metrics", f"plots/{VARIANT}", f"figures/{VARIANT}", f"work/fid/{VARIANT}"):
        shutil.rmtree(root / out, ignore_errors=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
    }
    for key in ("DDPM_PARAMS", "RAY_ADDRESS"):
        env.pop(key, None)
    command = [sys.executable, "-m", "stages.evaluate", "--variant", VARIANT]
    proc = subprocess.Popen(command, cwd=root, env=env, stderr=subprocess.PIPE)
    seen = bytearray()
    try:
        while b"Inception (" not in seen:  # the FID/IS pass has run: the NLL blocks are next
            chunk = proc.stderr.read1(4096)
            assert chunk, f"the stage ended before its Inception pass: {seen.decode()[-2000:]}"
            seen += chunk
        proc.send_signal(signal.SIGTERM)
        seen += proc.stderr.read()
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 128 + signal.SIGTERM, seen.decode()[-2000:]
    assert b"interrupted: finished work is kept; rerun to resume" in seen
    assert not (root / "metrics" / f"{VARIANT}.json").exists()
    assert not (root / "figures" / VARIANT).exists()
    assert not (root / "plots" / VARIANT).exists()
    again = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((root / "metrics" / f"{VARIANT}.json").read_text())
    assert metrics["fid_train"] == pytest.approx(read_metrics(project)["fid_train"], rel=1e-6)
    assert metrics["nll_bpd"] == pytest.approx(read_metrics(project)["nll_bpd"], rel=1e-6)
    assert {p.name for p in (root / "figures" / VARIANT).iterdir()} == FIGURES


# ---------------------------------------------------------------------------------------------
# One-line errors (exit 2, nothing written).


@pytest.fixture
def bare(tmp_path, monkeypatch):
    """A tiny project with data and a model but no samples, run from its folder."""
    make_project(tmp_path)
    make_model(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DDPM_PARAMS", raising=False)
    return tmp_path


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def assert_nothing_written(root: Path) -> None:
    for folder in ("metrics", "plots", "figures", "work/nll", "work/fid"):
        assert not (root / folder).exists(), folder


def test_missing_samples(bare, capsys):
    from stages import evaluate

    code, _, err = run_main(evaluate, capsys, "--variant", VARIANT)
    assert_one_line_error(code, err, f"run `dvc repro sample@{VARIANT}`", "manifest.json")
    assert_nothing_written(bare)


@pytest.mark.parametrize("damage", ["altered", "missing", "truncated", "unlisted"])
def test_damaged_sample_shard_is_one_line(bare, capsys, damage):
    """Samples stay sharded (no merged file); a shard that differs from the manifest stops
    evaluate with one line naming it, before any Inception pass."""
    from pipeline.atomic import save_npz
    from stages import evaluate

    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    folder = write_samples(bare, images)
    blocks = [f"block-{i:08d}-{i + 4:08d}.npz" for i in range(0, 16, 4)]
    assert sorted(p.name for p in folder.iterdir()) == [*blocks, "manifest.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(images.tobytes()).hexdigest()
    assert [s["sha256"] for s in manifest["shards"]] == [
        hashlib.sha256(images[i : i + 4].tobytes()).hexdigest() for i in range(0, 16, 4)
    ]
    shard = folder / blocks[1]
    needle = {"altered": "sha256 differs", "missing": "missing sample shard"}
    needle.update(truncated="unreadable sample shard", unlisted="shards hold 12 images")
    if damage == "altered":  # one pixel, the file rewritten whole (a new inode)
        changed = images[4:8].copy()
        changed[2, 3, 1, 0] ^= 1
        shard.unlink()
        save_npz(shard, images=changed)
    elif damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        data = shard.read_bytes()
        shard.unlink()
        shard.write_bytes(data[: len(data) // 2])
    else:  # the manifest lists one shard fewer than it counts
        manifest["shards"] = manifest["shards"][:3]
        (folder / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_main(evaluate, capsys, "--variant", VARIANT)
    name = folder.name if damage == "unlisted" else blocks[1]
    assert_one_line_error(code, err, needle[damage], name, f"sample@{VARIANT}")
    assert_nothing_written(bare)


def test_short_samples(bare, capsys):
    from stages import evaluate

    write_samples(bare, np.zeros((4, 8, 8, 3), np.uint8))
    code, _, err = run_main(evaluate, capsys, "--variant", VARIANT)
    assert_one_line_error(code, err, "4 images, need at least 16", f"sample@{VARIANT}")
    assert_nothing_written(bare)


def test_samples_of_another_resolution(bare, capsys):
    from stages import evaluate

    write_samples(bare, np.zeros((16, 16, 16, 3), np.uint8))
    code, _, err = run_main(evaluate, capsys, "--variant", VARIANT)
    assert_one_line_error(code, err, "the samples 16x16", "holds 8x8 images")
    assert_nothing_written(bare)


def test_wrong_inception_checksum_through_the_cli(bare):
    weights = bare / "inception.pth"
    weights.write_bytes(b"not the weights")
    params = yaml.safe_load((bare / "params.yaml").read_text())
    params["presets"]["tiny"]["eval"].update(
        inception_weights=str(weights), inception_sha256="0" * 64
    )
    (bare / "params.yaml").write_text(yaml.safe_dump(params))
    write_samples(bare, np.zeros((16, 8, 8, 3), np.uint8))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "stages.evaluate", "--variant", VARIANT]
    proc = subprocess.run(cmd, cwd=bare, env=env, capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc.returncode, proc.stderr, "sha256 mismatch", "0" * 64)
    assert "Traceback" not in proc.stderr
    assert_nothing_written(bare)


def test_bad_eval_settings_are_config_errors(bare, capsys):
    from stages import evaluate

    params = yaml.safe_load((bare / "params.yaml").read_text())
    params["presets"]["tiny"]["eval"]["recon_ts"] = [0, 20]
    (bare / "params.yaml").write_text(yaml.safe_dump(params))
    code, _, err = run_main(evaluate, capsys, "--variant", VARIANT)
    assert_one_line_error(code, err, "eval.recon_ts: [0] outside [1, 20]")
