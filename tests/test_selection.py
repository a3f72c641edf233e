"""Evaluation during training and the paper's checkpoint selection (App. B: the minimum FID).

A real tiny training run (in this process) leaves checkpoints every 2 steps; the evaluator
scores them with a scorer whose FIDs the test controls, then with the real one (samples of the
EMA weights, FID against stand-in reference statistics).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch
from train_project import VARIANT, make_project, tiny_config

from pipeline.evaluation.inception import InceptionWeights
from pipeline.training.checkpoint import read_checkpoint
from pipeline.training.eval_during import CheckpointEvaluator, score_checkpoint
from pipeline.training.export import export_weights
from pipeline.training.loop import TrainJob, run_worker
from pipeline.training.selection import EvalRecords, select_checkpoint, selection_note
from pipeline.training.session import LocalSession

FIDS = {4: 7.0, 8: 2.5, 12: 3.0}  # step -> the FID the controlled scorer returns
TRAIN = {"num_workers": 1, "steps": 12, "checkpoint_every": 2, "log_every": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(project root, run folder with every checkpoint of a 12-step run)."""
    root = tmp_path_factory.mktemp("sel")
    cfg = make_project(root, **TRAIN, eval_every=4, eval_samples=8)
    run_dir = root / "checkpoints" / VARIANT / "run"
    job = TrainJob(cfg, cfg.variant(VARIANT), str(root / "data" / cfg.scale), str(run_dir),
                   {"name": "run", "config_hash": "0"})  # fmt: skip
    run_worker(job, LocalSession(run_dir, keep=100))
    return root, run_dir


def _controlled(calls: list[int]):
    def scorer(cfg, variant, step, ema, reference, weights, weights_file) -> float:
        assert reference == STATS_BYTES and weights_file is None  # inputs by value, no path
        calls.append(step)
        return FIDS[step]

    return scorer


STATS_BYTES = b"stand-in reference statistics"  # the controlled scorer only checks they arrive
NO_WEIGHTS = InceptionWeights(None, "none", stand_in=True)


def _evaluator(root: Path, run_dir: Path, calls: list[int], select: str = "best_fid", **kw):
    cfg = tiny_config(**TRAIN, eval_every=4, eval_samples=8, select=select)
    (root / "ref.pt").write_bytes(STATS_BYTES)
    return cfg, CheckpointEvaluator(
        cfg, cfg.variant(VARIANT), run_dir, root / "ref.pt", root, scorer=_controlled(calls),
        run_task=False, weights=NO_WEIGHTS, **kw,
    )  # fmt: skip


def test_best_fid_selects_the_lowest_fid_checkpoint_and_resume_redoes_nothing(
    trained, tmp_path, monkeypatch
):
    root, run_dir = trained
    calls: list[int] = []
    cfg, evaluator = _evaluator(root, run_dir, calls)
    from pipeline.training import eval_during

    monkeypatch.setattr(eval_during, "SETTLE_S", 1e9)
    evaluator.poll()  # the newest checkpoint (12) may still be being written: not yet
    assert calls == [4, 8]
    monkeypatch.setattr(eval_during, "SETTLE_S", 0.0)
    evaluator.poll()  # its files have not changed for SETTLE_S seconds: complete
    assert calls == [4, 8, 12]  # every eval_every (4) steps, not every checkpoint (2)
    records = evaluator.finish()
    assert calls == [4, 8, 12]
    assert [(r["step"], r["fid"], r["n_samples"]) for r in records] == [
        (4, 7.0, 8), (8, 2.5, 8), (12, 3.0, 8)
    ]  # fmt: skip
    last = run_dir / "checkpoint_000000012"
    folder, selection = select_checkpoint("best_fid", evaluator.records, last)
    assert selection["selected_step"] == 8 and selection["evaluations"] == 3
    assert "step 8 selected (lowest FID 2.5 of 3 evaluated" in selection_note(selection)
    run = {"name": "run", "config_hash": "0"}
    extra = {"selection": selection}
    info = export_weights(folder, tmp_path / "model", cfg, cfg.variant(VARIANT), run, extra)
    assert info["steps"] == 8 and info["selection"]["selected_step"] == 8
    ema = torch.load(tmp_path / "model" / "ema.pt", weights_only=False)
    want = read_checkpoint(run_dir / "checkpoint_000000008")["ema"]
    state = ema.get("state_dict", ema)
    assert all(torch.equal(state[k], want[k]) for k in want)

    assert select_checkpoint("last", evaluator.records, last)[0] == last
    again: list[int] = []  # a restarted driver: the evaluations done are not redone
    _, resumed = _evaluator(root, run_dir, again)
    assert resumed.finish() == records and again == []


@pytest.mark.slow  # ~2 min on this shared CPU: three stand-in Inception builds and passes
def test_real_score_is_the_fid_of_the_ema_samples(trained):
    """score_checkpoint: eval_samples samples of the EMA weights, FID against reference
    statistics (stand-in Inception; 3 + 3 images: Inception on the CPU is the cost)."""
    from pipeline.data import open_split
    from pipeline.evaluation.feature_weights import resolve_inception_weights
    from pipeline.evaluation.fidelity import compute_fid_is, compute_reference_stats
    from pipeline.model.unet import build_unet
    from pipeline.sampling.draw import sample_images
    from pipeline.sampling.noise import SELECTION_STREAM, stream_seed
    from pipeline.training.loop import make_diffusion

    root, run_dir = trained
    cfg = tiny_config(**TRAIN, eval_every=4, eval_samples=3)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, inception_weights="stand-in"))
    variant = cfg.variant(VARIANT)
    weights = resolve_inception_weights(cfg.eval, root / "work" / "fidelity")
    train = open_split(root / "data" / cfg.scale, "train")[:3]
    ref = compute_reference_stats(train, "train", weights, root / "c", root / "ref", is_splits=1)
    checkpoint = run_dir / "checkpoint_000000012"
    ema = read_checkpoint(checkpoint)["ema"]
    data = Path(weights.path).read_bytes()
    fid = score_checkpoint(cfg, variant, 12, ema, ref.read_bytes(), weights, data)
    # independently: the EMA network's samples (sample section's seed), scored the same way
    diffusion = make_diffusion(cfg, variant)
    net = build_unet(cfg.model, cfg.data.resolution, diffusion.model_output_channels(3))
    net.load_state_dict(read_checkpoint(checkpoint)["ema"])
    seed = stream_seed(cfg.sample.seed, SELECTION_STREAM)  # not the final samples' stream
    images = sample_images(net.eval(), diffusion, range(3), seed, 8)
    want = compute_fid_is(images, {"train": ref}, weights, root / "c2", is_splits=1)
    assert fid > 0 and fid == pytest.approx(want["fid_train"], rel=1e-6)


def test_a_selection_sample_never_equals_a_final_sample(trained, monkeypatch):
    """score_checkpoint draws its eval_samples from another seed stream than the sample stage:
    every selection image's noise (x_T and each step's) differs from every final image's, so
    the final FID is never measured on the samples that chose the checkpoint."""
    import numpy as np

    from pipeline.evaluation import fidelity
    from pipeline.sampling import draw
    from pipeline.sampling.noise import ImageNoise

    _root, run_dir = trained
    cfg = tiny_config(**TRAIN, eval_every=4, eval_samples=4)
    drawn: list[tuple[int, list[int]]] = []
    monkeypatch.setattr(
        draw,
        "sample_images",
        lambda net, diffusion, indices, seed, *a: (
            drawn.append((seed, list(indices))) or np.zeros((len(indices), 8, 8, 3), np.uint8)
        ),
    )
    monkeypatch.setattr(fidelity, "compute_fid_is", lambda *a, **k: {"fid_train": 1.0})
    ema = read_checkpoint(run_dir / "checkpoint_000000004")["ema"]
    weights = InceptionWeights(None, "test", stand_in=True)
    assert score_checkpoint(cfg, cfg.variant(VARIANT), 4, ema, b"", weights, None) == 1.0
    [(seed, indices)] = drawn
    assert indices == list(range(cfg.train.eval_samples))
    shape = (1, 3, 8, 8)
    final = [ImageNoise(cfg.sample.seed, [j])(shape) for j in range(cfg.sample.n_samples)]
    for i in indices:
        x_t = ImageNoise(seed, [i])(shape)
        assert not any(torch.equal(x_t, other) for other in final), i


def test_records_are_files_and_the_best_copy_survives_ray_pruning(trained, tmp_path):
    _, run_dir = trained
    records = EvalRecords(tmp_path)
    records.add({"step": 4, "fid": 5.0, "n_samples": 8}, run_dir / "checkpoint_000000004")
    records.add({"step": 8, "fid": 6.0, "n_samples": 8}, run_dir / "checkpoint_000000008")
    assert records.done() == {4, 8} and records.best()["step"] == 4
    assert read_checkpoint(records.best_checkpoint())["step"] == 4  # a copy, not a link


def test_the_scorer_task_needs_no_path_of_the_driver(trained, tmp_path, ray_session):
    """The real scorer as a Ray task, its driver's inputs (reference statistics, feature-network
    weights, the run's checkpoints) moved away right after submission: it still scores, the
    same FID as in this process, because everything reached it through Ray's object store."""
    import shutil

    from pipeline.data import open_split
    from pipeline.evaluation.featurenet import SmallClassifier, classifier_weights, save_classifier
    from pipeline.evaluation.fidelity import compute_reference_stats
    from pipeline.layout import classifier_path, reference_dir

    root, run_dir = trained
    cfg = tiny_config(**TRAIN, eval_every=12, eval_samples=4)  # one evaluation: step 12
    driver = tmp_path / "driver"  # the driver's project folder: featurenet/, reference/
    torch.manual_seed(0)
    net = SmallClassifier(cfg.data.resolution, 10)  # untrained: a fixed feature map suffices
    save_classifier(net, driver / classifier_path(cfg.scale))
    weights = classifier_weights(driver / classifier_path(cfg.scale))
    images = open_split(root / "data" / cfg.scale, "train")[:8]
    ref_dir = driver / reference_dir(cfg.scale)
    stats = compute_reference_stats(images, "train", weights, tmp_path / "c", ref_dir, is_splits=1)
    run = tmp_path / "run"
    shutil.copytree(run_dir / "checkpoint_000000012", run / "checkpoint_000000012")
    ema = read_checkpoint(run / "checkpoint_000000012")["ema"]
    want = score_checkpoint(
        cfg, cfg.variant(VARIANT), 12, ema, stats.read_bytes(), weights, weights.path.read_bytes()
    )

    evaluator = CheckpointEvaluator(cfg, cfg.variant(VARIANT), run, stats, driver)
    evaluator.poll(newest_too=True)
    assert list(evaluator.in_flight) == [12]
    driver.rename(tmp_path / "gone")  # every path the driver named is gone now
    (run / "checkpoint_000000012").rename(tmp_path / "gone-checkpoint")
    records = evaluator.finish()
    assert evaluator.failed == set() and evaluator.evaluated_now == [12]
    assert [(r["step"], r["n_samples"]) for r in records] == [(12, 4)]
    assert records[0]["fid"] > 0 and records[0]["fid"] == pytest.approx(want, rel=1e-5)
    assert (run / "evals" / "best" / "selected.json").is_file()  # the driver's copy, kept


def test_checkpoints_in_a_bucket_are_found_and_their_records_kept_there(trained, tmp_path):
    """A bucket run (s3:// on a moto server): the evaluator finds the complete checkpoints in
    the bucket's listing (not a half-uploaded one), uploads its records there, and a
    resubmitted driver (an empty mirror) downloads them and redoes nothing."""
    import os

    from moto_s3 import make_bucket, moto_server, s3_env

    from pipeline.cluster.storage_fs import Store

    _, run_dir = trained
    with moto_server(tmp_path / "moto.log") as endpoint:
        old = {k: os.environ.get(k) for k in s3_env(endpoint)}
        os.environ.update(s3_env(endpoint))
        try:
            make_bucket(endpoint, "evals")
            store, rel = Store.parse("s3://evals/ddpm"), Path("checkpoints") / VARIANT / "run"
            path, arrow = store.ray_storage(rel)  # Ray Train's filesystem: "folder" objects
            for step in (4, 8, 12):
                name = f"checkpoint_{step:09d}"
                arrow.create_dir(f"{path}/{name}")
                store.put_dir(run_dir / name, rel / name)
            store.put_file(run_dir / "checkpoint_000000012" / "meta.json",
                           rel / "checkpoint_000000016" / "meta.json")  # fmt: skip  # no state.pt
            calls: list[int] = []
            mirror = tmp_path / "a" / "run"
            _, evaluator = _evaluator(tmp_path, mirror, calls, bucket=(store, rel))
            evaluator.poll()
            assert calls == [4, 8, 12]  # complete ones, at once; 16 is still being uploaded
            records = evaluator.finish()
            assert [(r["step"], r["fid"]) for r in records] == [(4, 7.0), (8, 2.5), (12, 3.0)]
            kept = store.list(rel / "evals")
            assert {"step-000000004.json", "step-000000012.json", "best/state.pt"} <= set(kept)
            again: list[int] = []
            _, resumed = _evaluator(tmp_path, tmp_path / "b" / "run", again, bucket=(store, rel))
            assert resumed.finish() == records and again == []
            assert resumed.records.best()["step"] == 8
            best = read_checkpoint(resumed.records.best_checkpoint())["ema"]
            want = read_checkpoint(run_dir / "checkpoint_000000008")["ema"]
            assert all(torch.equal(best[k], want[k]) for k in want)
        finally:
            for key, value in old.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def test_a_truncated_checkpoint_is_skipped_then_scored_once_complete(trained, tmp_path, caplog):
    """Ray Train writes checkpoint_<step>/ in place: on NFS the evaluator may see a truncated
    state.pt. It is not scored (one warning line, the thread goes on), and once the file is
    whole it is scored; the exported step is then the lowest-FID one of all evaluated."""
    import shutil

    from pipeline.training import eval_during

    root, run_dir = trained
    run = tmp_path / "run"
    for step in (4, 8, 12):
        name = f"checkpoint_{step:09d}"
        shutil.copytree(run_dir / name, run / name)
    state = run / "checkpoint_000000008" / "state.pt"
    whole = state.read_bytes()
    state.write_bytes(whole[: len(whole) // 2])  # half written
    calls: list[int] = []
    _, evaluator = _evaluator(root, run, calls)
    eval_during.SETTLE_S, settle = 0.0, eval_during.SETTLE_S
    try:
        with caplog.at_level("WARNING", logger=eval_during.__name__):
            evaluator.show({"event": "interval", "step": 12})  # as the progress reader calls it
            evaluator.show({"event": "interval", "step": 12})  # still truncated: no new line
        assert calls == [4, 12] and evaluator.records.done() == {4, 12}
        warned = [r.getMessage() for r in caplog.records]
        assert len(warned) == 1 and "step 8 not loadable yet" in warned[0]
        state.write_bytes(whole)  # Ray Train finished writing it
        evaluator.show({"event": "interval", "step": 12})
        assert calls == [4, 12, 8]
    finally:
        eval_during.SETTLE_S = settle
    records = evaluator.finish()
    assert [(r["step"], r["fid"]) for r in records] == [(4, 7.0), (8, 2.5), (12, 3.0)]
    folder, selection = select_checkpoint("best_fid", evaluator.records, run / "x")
    assert selection["selected_step"] == min(records, key=lambda r: r["fid"])["step"] == 8
    assert read_checkpoint(folder)["step"] == 8  # the copy kept is step 8's, not step 12's


def test_a_checkpoint_first_seen_truncated_at_the_end_is_read_again(
    trained, tmp_path, monkeypatch, caplog
):
    """The last poll (finish(), training over) is the first to see step 8, cut short (its
    writer just ended; NFS serves the old size): not "never loaded", it is read again a poll
    later, whole, and scored."""
    from pipeline.training import checkpoint, eval_during

    root, run_dir = trained
    real_read, cut = checkpoint.read_checkpoint, []

    def read_checkpoint(folder):
        if Path(folder).name == ".pending-000000008" and not cut:
            state = Path(folder) / checkpoint.STATE
            whole = state.read_bytes()
            state.write_bytes(whole[: len(whole) // 2])  # the evaluator's copy: half
            cut.append(len(whole))
        return real_read(folder)

    monkeypatch.setattr(checkpoint, "read_checkpoint", read_checkpoint)
    monkeypatch.setattr(eval_during, "POLL_S", 0.01)
    calls: list[int] = []
    _, evaluator = _evaluator(root, run_dir, calls)
    evaluator.records = EvalRecords(tmp_path / "records")  # the trained run's own stay clean
    with caplog.at_level("WARNING", logger=eval_during.__name__):
        records = evaluator.finish()
    assert cut and calls == [4, 12, 8]
    assert [r["step"] for r in records] == [4, 8, 12] and evaluator.records.best()["step"] == 8
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "step 8 not loadable yet" in warned[0], warned


def test_a_failing_scorer_or_storage_error_is_a_warning_and_a_retry(trained, tmp_path, monkeypatch):
    """The scorer fails once for step 8 (a lost node), and listing the run fails once (a
    storage outage): each is a warning, progress goes on, and finish() scores step 8."""
    from pipeline.training import eval_during

    root, run_dir = trained
    calls: list[int] = []
    failed_once: list[int] = []

    def flaky(cfg, variant, step, ema, reference, weights, weights_file) -> float:
        if step == 8 and not failed_once:
            failed_once.append(step)
            raise RuntimeError("the node running the scorer died")
        calls.append(step)
        return FIDS[step]

    cfg = tiny_config(**TRAIN, eval_every=4, eval_samples=8, select="best_fid")
    (root / "ref.pt").write_bytes(STATS_BYTES)
    evaluator = CheckpointEvaluator(
        cfg, cfg.variant(VARIANT), run_dir, root / "ref.pt", tmp_path, scorer=flaky,
        run_task=False, weights=NO_WEIGHTS,
    )  # fmt: skip
    evaluator.records = EvalRecords(tmp_path / "records")  # the trained run's own stay clean
    outage = [OSError("NFS server not responding")]
    due = eval_during.due_steps

    def listing(*args):
        if outage:
            raise outage.pop()
        return due(*args)

    monkeypatch.setattr(eval_during, "due_steps", listing)
    monkeypatch.setattr(eval_during, "SETTLE_S", 0.0)
    evaluator.show({"event": "interval", "step": 12})  # the outage: a warning, no exception
    assert calls == []
    evaluator.show({"event": "interval", "step": 12})
    assert calls == [4, 12] and evaluator.failed == {8}
    records = evaluator.finish()
    assert calls == [4, 12, 8] and [r["step"] for r in records] == [4, 8, 12]
    assert evaluator.records.best()["step"] == 8


def test_a_sink_that_raises_does_not_stop_progress(ray_session, caplog):
    """A progress sink that raises (MLflow unreachable, a bug) is one warning line; the reader
    thread keeps feeding every sink every update."""
    from pipeline.cluster.progress import BoardReader, ProgressBoard

    class Broken:
        def show(self, update):
            raise ConnectionError("tracking server down")

    class Seen:
        def __init__(self):
            self.steps: list[int] = []

        def show(self, update):
            self.steps.append(update["step"])

    board, seen = ProgressBoard.remote(), Seen()
    with caplog.at_level("WARNING"), BoardReader(board, [Broken(), seen], every=0.05) as reader:
        for step in range(1, 6):
            ray_session.get(board.push.remote({"event": "interval", "step": step}))
            deadline = time.monotonic() + 30
            while step not in seen.steps and time.monotonic() < deadline:
                time.sleep(0.02)
        assert reader._thread.is_alive()
    assert seen.steps == [1, 2, 3, 4, 5]
    warned = [r.getMessage() for r in caplog.records if "progress sink" in r.getMessage()]
    assert len(warned) == 1 and "Broken failed: ConnectionError" in warned[0]
    ray_session.kill(board)
