"""Elastic training (``train.num_workers: [min, max]``): the range in params, the ScalingConfig
Ray Train gets, a run identity that ignores the worker count, and the record of every world-size
change (MLflow tag and metric, progress line, report note). Seconds in all, without Ray; the
real-Ray proof (a node lost, a node joined) is tests/test_elastic_ray.py (slow)."""

from __future__ import annotations

import io

import mlflow
import pandas as pd
import pytest
import torch
from train_project import VARIANT, make_project, tiny_config, tiny_params

from pipeline.cluster.progress import ProgressDisplay
from pipeline.config import allowed_world_sizes, config_from_dict
from pipeline.errors import ConfigError
from pipeline.layout import data_dir
from pipeline.report.page import variant_part, world_size_notes
from pipeline.report.tracking import TAG_WORLD_SIZES
from pipeline.training.identity import run_identity
from pipeline.training.loop import StepInputs, TrainJob, _replica_clipping
from pipeline.training.trainer import make_trainer, scaling_options
from pipeline.training.worldsize import WorldSizes, format_changes, parse_changes


def test_a_range_is_read_as_min_and_max_and_a_number_stays_a_number():
    cfg = tiny_config(num_workers=[1, 2], elastic_resize_s=5)
    t = cfg.train
    assert t.num_workers == (1, 2) and (t.min_workers, t.max_workers) == (1, 2)
    assert t.elastic and list(t.worker_counts()) == [1, 2] and t.elastic_resize_s == 5.0
    fixed = tiny_config(num_workers=2).train
    assert fixed.num_workers == 2 and not fixed.elastic and list(fixed.worker_counts()) == [2]
    assert not tiny_config(num_workers=[2, 2]).train.elastic  # [n, n]: n workers


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"num_workers": [2, 1]}, r"range \[min, max\] with 1 <= min <= max \(got \[2, 1\]\)"),
        ({"num_workers": [0, 2]}, r"1 <= min <= max \(got \[0, 2\]\)"),
        ({"num_workers": [1, 2, 4]}, r"range \[min, max\] .*\(got \[1, 2, 4\]\)"),
        ({"num_workers": []}, r"1 <= min <= max \(got \[\]\)"),
        ({"num_workers": [1, 3]}, r"W = 3 does not split train\.batch_size \(8\) evenly; "
                                  r"allowed W up to 3: 1, 2 \(ranges that pass: \[1, 2\]\)"),
        (
            {"num_workers": [1, 4], "clip_replicas": 4},
            r"W = 3 does not split train\.batch_size \(8\) and train\.clip_replicas \(4\) evenly;"
            r" allowed W up to 4: 1, 2, 4 \(ranges that pass: \[1, 2\], 4\)",
        ),
        ({"num_workers": [1, 2], "elastic_resize_s": -1}, r"elastic_resize_s must be 0 or more"),
        ({"num_workers": [1, 2], "backend": "process"}, r"needs num_workers 1.*\(got \[1, 2\],"),
    ],
)  # fmt: skip
def test_a_bad_range_is_one_config_error_line_naming_the_w(train, message):
    with pytest.raises(ConfigError, match=message) as error:
        tiny_config(**train)
    assert "\n" not in str(error.value)
    assert str(error.value).startswith("presets.tiny.train.")


def test_the_paper_preset_lists_the_w_its_replicas_allow():
    """128 images in 8 replicas: W in 1, 2, 4, 8; [4, 8] would let Ray run 5, 6 or 7 workers."""
    raw = tiny_params()
    raw["scale"] = "paper"
    raw["presets"]["paper"]["train"]["num_workers"] = [4, 8]
    message = r"W = 5, 6, 7 do not split .* to 8: 1, 2, 4, 8 \(ranges that pass: \[1, 2\], 4, 8\)"
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)
    raw["presets"]["paper"]["train"]["num_workers"] = [1, 2]
    t = config_from_dict(raw).train
    assert allowed_world_sizes(t, 8) == [1, 2, 4, 8] and t.worker_counts() == range(1, 3)


def test_ray_train_gets_the_range_and_the_resize_interval(tmp_path):
    """The TorchTrainer's ScalingConfig, built without starting anything."""
    elastic = tiny_config(num_workers=[1, 2], elastic_resize_s=3)
    options = scaling_options(elastic.train)
    assert options["num_workers"] == (1, 2) and options["elastic_resize_monitor_interval_s"] == 3
    run = {"name": "r", "config_hash": "h"}
    job = TrainJob(elastic, elastic.variant(VARIANT), str(tmp_path), str(tmp_path / "run"), run)
    scaling = make_trainer(job).scaling_config
    assert scaling.num_workers == (1, 2) and scaling.elasticity_enabled
    assert (scaling.min_workers, scaling.max_workers) == (1, 2)
    assert scaling.elastic_resize_monitor_interval_s == 3.0
    for fixed in (2, [2, 2]):  # a number (or [n, n]): Ray's fixed scaling, as before
        options = scaling_options(tiny_config(num_workers=fixed).train)
        assert options["num_workers"] == 2 and "elastic_resize_monitor_interval_s" not in options


def test_the_run_name_does_not_depend_on_the_workers(tmp_path):
    """A run resumes on another number of workers, or after the range changed: same name."""
    cfg = make_project(tmp_path)
    data = tmp_path / data_dir(cfg.scale)
    names = {
        run_identity(tiny_config(**keys), cfg.variant(VARIANT), data)["name"]
        for keys in (
            {"num_workers": 1},
            {"num_workers": 2},
            {"num_workers": [1, 2]},
            {"num_workers": [1, 2], "elastic_resize_s": 1},
        )
    }
    assert len(names) == 1
    assert run_identity(tiny_config(lr=1e-4), cfg.variant(VARIANT), data)["name"] not in names


def test_changes_format_and_parse():
    changes = [(4, 2, 1), (12, 1, 2)]
    assert format_changes(changes) == "4: 2 -> 1; 12: 1 -> 2"
    assert parse_changes(format_changes(changes)) == changes
    assert parse_changes(None) == parse_changes("") == []


def test_every_restart_is_logged_and_every_change_tagged(tmp_path):
    """The sink on a real SQLite store; a second job of the run (a new sink) continues the
    record from the world size the first one logged last."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    sink = WorldSizes(uri, run_id)
    for step, size in ((0, 2), (4, 1), (4, 1), (8, 2)):  # a restart at 4 on the same size
        sink.show({"event": "start", "step": step, "total": 20, "world_size": size})
    sink.show({"event": "interval", "step": 12, "loss": 1.0})  # not a start: ignored
    tags = client.get_run(run_id).data.tags
    assert tags[TAG_WORLD_SIZES] == "4: 2 -> 1; 8: 1 -> 2"
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "world_size")]
    assert sorted(history) == [(0, 2), (4, 1), (4, 1), (8, 2)]
    again = WorldSizes(uri, run_id)  # a resubmitted job
    assert again.last == 2 and again.changes == [(4, 2, 1), (8, 1, 2)]
    again.show({"event": "start", "step": 12, "total": 20, "world_size": 2})  # no change
    again.show({"event": "start", "step": 16, "total": 20, "world_size": 1})
    assert client.get_run(run_id).data.tags[TAG_WORLD_SIZES] == "4: 2 -> 1; 8: 1 -> 2; 16: 2 -> 1"


def test_a_failing_store_is_one_warning_and_training_goes_on(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).search_experiments()  # the store exists; the run does not
    sink = WorldSizes(uri, "0" * 32)
    for step, size in ((0, 2), (4, 1)):
        sink.show({"event": "start", "step": step, "total": 8, "world_size": size})
    warnings = [r for r in caplog.records if "MLflow logging failed" in r.getMessage()]
    assert len(warnings) == 1 and sink.changes == [(4, 2, 1)]


def test_a_restart_on_other_workers_says_so_in_the_progress_lines():
    stream = io.StringIO()
    display = ProgressDisplay("train v", total=12, stream=stream)
    for step, size in ((0, 2), (4, 2), (4, 1)):
        display.show({"event": "start", "step": step, "total": 12, "world_size": size})
    assert stream.getvalue().splitlines() == [
        "train v: restarted from the checkpoint at step 4",
        "train v: restarted from the checkpoint at step 4 on 1 workers (was 2)",
    ]


def test_the_report_shows_a_line_per_change(tmp_path):
    cfg = tiny_config()
    assert world_size_notes("4: 2 -> 1; 8: 1 -> 2") == [
        "world size 2 -> 1 at step 4",
        "world size 1 -> 2 at step 8",
    ]
    assert world_size_notes(None) == world_size_notes(float("nan")) == []
    runs = pd.DataFrame({f"tags.{TAG_WORLD_SIZES}": ["4: 2 -> 1"]}, index=[VARIANT])
    part = variant_part(cfg, runs, VARIANT, tmp_path)
    assert "world size 2 -> 1 at step 4" in part.note.split("; ")


class _Session:
    """What StepInputs and the replica split read from a session: rank, live world size."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size, self.device = rank, world_size, torch.device("cpu")


def test_a_restart_on_any_allowed_w_splits_the_same_batch_and_replicas(tmp_path):
    """The loop builds its batch shard and replica share from the session's live world size
    (not from train.num_workers): over the ranks of W = 1, 2 or 4 the images, t and noise of a
    step are the global batch's, in order, and the 4 replicas are each clipped by one rank."""
    cfg = make_project(tmp_path, num_workers=[1, 2], clip_replicas=4)
    run = {"name": "r", "config_hash": "h"}
    job = TrainJob(cfg, cfg.variant(VARIANT), str(tmp_path / data_dir(cfg.scale)), "", run)
    whole = StepInputs(job, _Session(0, 1))(5)
    for world in allowed_world_sizes(cfg.train, 4):
        ranks = [_Session(rank, world) for rank in range(world)]
        shards = [StepInputs(job, session)(5) for session in ranks]
        for part, full in zip(zip(*shards, strict=True), whole, strict=True):
            assert torch.equal(torch.cat(part), full)
        shares = [_replica_clipping(cfg, session) for session in ranks]
        owned = [s.first + i for s in shares if s is not None for i in range(s.local)]
        assert owned == list(range(4)), world
        assert all(s is not None and s.world_size == world for s in shares)
