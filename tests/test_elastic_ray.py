"""Elastic training on a real two-node Ray cluster (slow): a node lost, a node joined.

Ray's own multi-node cluster on this machine (``ray.cluster_utils.Cluster``: a head and a second
node, a raylet each, 1 CPU each, with Ray's token authentication, sharing this machine's
files: lighter than tests/two_node.py's hidden node), the tiny preset with ``num_workers: [1,
2]`` and ``clip_replicas: 4`` (12 steps, a checkpoint every 4; elastic_resize_s 1; 4 replicas:
with 2 the sum's order could not matter) trained by ``train_variant`` from this
process. Rank 0 hangs before step 6 (``hang:0:6``, once), after the checkpoint of step 4 is
registered; then

- **lost**: the second node is SIGKILLed (all its processes) and never replaced: Ray Train
  restarts from the checkpoint of step 4 on the one worker the head holds and finishes;
- **joined**: the run started on the head alone (1 worker); a second node joins: at the next
  resize check the group grows to 2 workers, restarting from the checkpoint of step 4.

Both record the change (tag ``ddpm.world_size_changes``, metric ``world_size``, the run's final
``ddpm.world_size``), and both end with the final EMA weights bit-identical to an undisturbed
1-worker run (the stage's own process, ``backend: process``, no Ray) and to an undisturbed
2-worker Ray Train run (the third test): the exact reduction over workers
(pipeline/training/replicas.py) makes the update a function of the 4 replicas alone. ~1-2 min
each on 2 cores.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from train_project import VARIANT, make_project, registered

from pipeline.cluster.raycluster import AUTH_MODE, LOCAL_ONLY, ensure_token
from pipeline.report.tracking import TAG_WORLD_SIZES
from pipeline.training import faults
from pipeline.training.trainer import HEALTH_CHECK_ENV, HEALTH_CHECK_S, train_variant

pytestmark = pytest.mark.slow


NODE = {"num_cpus": 1}  # on the machine's address, as a node must be to join: with a token


@pytest.fixture
def cluster(monkeypatch) -> Iterator[Cluster]:
    """A head with 1 CPU with Ray's token authentication (the token a local run uses,
    pipeline.cluster.raycluster.ensure_token), this process its driver; the test adds (and
    removes) nodes. Ray's helper points /tmp/ray/ray_current_cluster at it while it runs."""
    from ray._raylet import Config

    monkeypatch.delenv(LOCAL_ONLY, raising=False)  # single-machine mode would refuse a node
    monkeypatch.setenv(HEALTH_CHECK_ENV, HEALTH_CHECK_S)
    monkeypatch.setenv(AUTH_MODE, "token")  # the nodes (processes) read it; this process:
    Config.initialize("")  # as ray.init's own switch to token mode does
    ensure_token(os.environ)
    if ray.is_initialized():
        ray.shutdown()
    head = {**NODE, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head, shutdown_at_exit=False)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def when_rank0_hangs(root: Path, action: Callable[[], None]) -> threading.Thread:
    """Run ``action`` in a thread once rank 0 hangs before step 6 and Ray Train has registered
    the checkpoint of step 4 (what the restart resumes from)."""
    runs, step4 = root / "checkpoints" / VARIANT, "checkpoint_000000004"

    def wait() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if list(runs.glob("*/.test-fault-hang-0-6")) and registered(runs, step4):
                action()
                return
            time.sleep(0.5)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def train(root: Path, monkeypatch, fault: str | None = "hang:0:6", **train: object):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    if fault:
        monkeypatch.setenv(faults.ENV, fault)
    else:
        monkeypatch.delenv(faults.ENV, raising=False)
    settings = {"num_workers": [1, 2], "elastic_resize_s": 1, "max_failures": 2, **train}
    cfg = make_project(root, clip_replicas=4, **settings)
    return train_variant(cfg, cfg.variant(VARIANT), root)


def ema(summary) -> dict[str, torch.Tensor]:
    """The final EMA weights of a finished run."""
    payload = torch.load(summary.model_dir / "ema.pt", map_location="cpu", weights_only=True)
    return payload["state_dict"]


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The EMA weights of the same 12 steps on one worker in the stage's own process."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        root = tmp_path_factory.mktemp("undisturbed")
        summary = train(root, monkeypatch, None, backend="process", num_workers=1)
    assert summary.restarts == [] and summary.steps == 12
    return ema(summary)


def assert_same_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def world_sizes(root: Path, summary) -> tuple[str, list[tuple[int, float]], str]:
    """The run's change tag, its world_size history (step, value) and its final world size."""
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(summary.mlflow_run_id)
    history = sorted(
        (m.timestamp, m.step, m.value)
        for m in client.get_metric_history(summary.mlflow_run_id, "world_size")
    )
    points = [(step, value) for _, step, value in history]
    return run.data.tags.get(TAG_WORLD_SIZES, ""), points, run.data.tags["ddpm.world_size"]


def test_a_lost_node_training_goes_on_on_the_workers_left(
    cluster, tmp_path, monkeypatch, undisturbed
):
    second = cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    killer = when_rank0_hangs(tmp_path, lambda: cluster.remove_node(second, allow_graceful=False))
    start = time.perf_counter()
    summary = train(tmp_path, monkeypatch)
    seconds = time.perf_counter() - start
    killer.join(5)
    assert sum(n["Alive"] for n in ray.nodes()) == 1  # the node stayed lost
    assert (summary.start, summary.restarts, summary.steps) == (0, [4], 12)
    tag, points, final = world_sizes(tmp_path, summary)
    assert points == [(0, 2.0), (4, 1.0)] and tag == "4: 2 -> 1" and final == "1"
    assert_same_bits(ema(summary), undisturbed)
    print(f"\nelastic, a node lost at step 4: 2 -> 1 workers, 12 steps in {seconds:.0f} s")


def test_a_joined_node_grows_the_group(cluster, tmp_path, monkeypatch, undisturbed):
    joiner = when_rank0_hangs(tmp_path, lambda: cluster.add_node(**NODE))
    start = time.perf_counter()
    summary = train(tmp_path, monkeypatch)
    seconds = time.perf_counter() - start
    joiner.join(5)
    assert (summary.start, summary.restarts, summary.steps) == (0, [4], 12)
    tag, points, final = world_sizes(tmp_path, summary)
    assert points == [(0, 1.0), (4, 2.0)] and tag == "4: 1 -> 2" and final == "2"
    assert_same_bits(ema(summary), undisturbed)
    print(f"\nelastic, a node joined at step 4: 1 -> 2 workers, 12 steps in {seconds:.0f} s")


def test_two_undisturbed_workers_give_the_one_workers_bits(
    cluster, tmp_path, monkeypatch, undisturbed
):
    cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    summary = train(tmp_path, monkeypatch, None, num_workers=2)
    assert summary.restarts == [] and summary.steps == 12
    assert world_sizes(tmp_path, summary)[1] == [(0, 2.0)]
    assert_same_bits(ema(summary), undisturbed)
