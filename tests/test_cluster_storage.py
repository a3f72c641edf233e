"""Cluster storage without a cluster: the setting, its errors, the state a resubmission restores.

Files read from (shared) storage never execute code: a tampered file is refused. The two-node
runs are in test_two_node.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from repo_copy import PARAMS, write_tree

from pipeline.cluster import durable, storage
from pipeline.cluster.storage_fs import Store
from pipeline.config import load_config
from pipeline.errors import ConfigError, DataError, UserError
from pipeline.evaluation.fidelity import load_numpy_dict

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this would create a file: what a tampered cache could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_statistics_are_arrays_and_a_tampered_file_is_refused(tmp_path):
    stats = {"mu": np.arange(3, dtype=np.float32), "sigma": np.eye(3)}
    torch.save(stats, tmp_path / "stat.pt")  # what torch-fidelity writes
    loaded = load_numpy_dict(tmp_path / "stat.pt")
    assert loaded["mu"].dtype == np.float32 and loaded["sigma"].dtype == np.float64
    np.testing.assert_array_equal(loaded["sigma"], stats["sigma"])
    marker = tmp_path / "code-ran"
    torch.save({"mu": stats["mu"], "sigma": Payload(marker)}, tmp_path / "tampered.pt")
    with pytest.raises(DataError, match="refused"):
        load_numpy_dict(tmp_path / "tampered.pt")
    assert not marker.exists()
    torch.save({"mu": [1.0]}, tmp_path / "list.pt")
    with pytest.raises(DataError, match="refused"):
        load_numpy_dict(tmp_path / "list.pt")


def test_the_storage_setting_and_its_errors(tmp_path, monkeypatch):
    cfg = load_config(PARAMS, "tiny")
    monkeypatch.delenv(storage.ENV, raising=False)
    assert cfg.cluster.storage is None and storage.check_storage(cfg) is None  # the default
    monkeypatch.setenv(storage.ENV, str(tmp_path / "shared"))
    store = storage.check_storage(cfg)
    assert store.local_path() == tmp_path / "shared" and (tmp_path / "shared").is_dir()
    for bad, match in (("ftp://bucket/x", "unknown scheme"), ("rel/path", "absolute")):
        monkeypatch.setenv(storage.ENV, bad)
        with pytest.raises(ConfigError, match=match):
            storage.check_storage(cfg)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(storage.ENV, str(tmp_path / "file" / "below"))
    with pytest.raises(UserError, match="not writable"):
        storage.check_storage(cfg)


def test_prepared_data_and_block_folders_move_to_storage(tmp_path, monkeypatch):
    cfg = load_config(PARAMS, "tiny")
    local = tmp_path / "project" / "data" / "tiny"
    local.mkdir(parents=True)
    (local / "manifest.json").write_text("{}")
    (local / "train.npy").write_bytes(b"x" * 10)
    monkeypatch.setenv(storage.ENV, str(tmp_path / "shared"))
    shared = Path(storage.shared_data(cfg, local))
    assert storage.node_local_data(str(shared)) == shared  # a folder store: mapped in place
    assert shared.parent == tmp_path / "shared" / "data" and shared.name.startswith("tiny-")
    assert (shared / "train.npy").read_bytes() == b"x" * 10
    assert Path(storage.shared_data(cfg, local)) == shared  # copied once
    work = storage.shared_path(cfg, tmp_path / "project", Path("work/sample/v"))
    assert work == tmp_path / "shared" / "work" / "sample" / "v"
    pointer = tmp_path / "project" / "work" / "sample" / "v" / storage.POINTER
    assert pointer.read_text().strip() == str(work)  # the local DVC out exists


def test_state_round_trip_skips_a_tampered_torch_file(tmp_path):
    project, state, again = tmp_path / "p", tmp_path / "state", tmp_path / "q"
    (project / "metrics").mkdir(parents=True)
    (project / "dvc.lock").write_text("schema: '2.0'\n")
    (project / "params.resolved.yaml").write_text("scale: tiny\n")  # in git as another scale's
    (project / "metrics" / "v.json").write_text("{}")
    (project / "work" / "fid" / "v").mkdir(parents=True)
    torch.save({"mu": np.zeros(2)}, project / "work" / "fid" / "v" / "good.pt")
    torch.save({"x": Payload(tmp_path / "ran")}, project / "work" / "fid" / "v" / "bad.pt")
    (project / "models").mkdir()  # cached outputs go through the DVC remote, not the state
    (project / "models" / "ema.pt").write_bytes(b"w")
    store, rel = Store(str(tmp_path)), Path("state")
    assert durable.save_state(project, store, rel) > 0
    assert durable.save_state(project, store, rel) == 0  # unchanged files are not copied again
    assert not (state / "models").exists()
    again.mkdir()
    (again / "params.resolved.yaml").write_text("scale: smoke\n")  # the fresh job's checkout
    assert durable.restore_state(store, rel, again)
    assert (again / "dvc.lock").is_file() and (again / "metrics" / "v.json").is_file()
    assert (again / "params.resolved.yaml").read_text() == "scale: tiny\n"  # what dvc.lock holds
    assert (again / "work" / "fid" / "v" / "good.pt").is_file()
    assert (
        not (again / "work" / "fid" / "v" / "bad.pt").exists() and not (tmp_path / "ran").exists()
    )
    assert not durable.restore_state(store, Path("empty"), again)


def test_a_ray_job_without_a_durable_mlflow_store_is_one_error_line(tmp_path, monkeypatch):
    cfg = load_config(PARAMS, "tiny")
    monkeypatch.delenv(durable.RAY_JOB_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    durable.check_job_tracking(cfg, tmp_path)  # not a Ray job: the local default is fine
    monkeypatch.setenv(durable.RAY_JOB_ENV, "{}")
    with pytest.raises(UserError, match="MLFLOW_TRACKING_URI is not set"):
        durable.check_job_tracking(cfg, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'sub' / 'm.db'}")
    with pytest.raises(UserError, match="temporary working directory"):
        durable.check_job_tracking(cfg, tmp_path)
    for fine in ("http://127.0.0.1:5000", f"sqlite:///{tmp_path.parent / 'elsewhere.db'}"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", fine)
        durable.check_job_tracking(cfg, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({durable.RAY_JOB_ENV: "{}", "PYTHONPATH": str(ROOT)})
    run = subprocess.run(
        [sys.executable, "-m", "stages.repro"],
        cwd=write_tree(tmp_path / "repo"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and run.stdout == ""
    assert (
        run.stderr.startswith("error: MLFLOW_TRACKING_URI is not set")
        and run.stderr.count("\n") == 1
    )


def test_a_rejected_push_is_one_error_line_naming_the_remote(tmp_path, monkeypatch):
    """A real ``dvc push`` that fails (here: no DVC project) becomes one UserError line."""
    from stages.repro import dvc

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    with pytest.raises(UserError, match=f"push of stage train@v to {tmp_path / 'dvc'} failed"):
        durable.push(dvc, Store(str(tmp_path)), "train@v")


def test_repro_uses_its_own_environments_dvc_and_python(monkeypatch):
    """``.venv/bin/python -m stages.repro`` from a shell without the venv on PATH finds the venv's
    dvc (and dvc.yaml's ``python`` is the venv's) rather than failing with a traceback."""
    import shutil

    from stages.repro import use_this_environment

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    use_this_environment()
    bin_dir = str(Path(sys.executable).parent)
    assert os.environ["PATH"].split(os.pathsep)[0] == bin_dir
    assert Path(shutil.which("dvc")).parent == Path(bin_dir)
    assert Path(shutil.which("python")).parent == Path(bin_dir)
    use_this_environment()  # idempotent
    assert os.environ["PATH"].count(bin_dir) == 1


def test_a_stop_reaches_the_stage_dvc_starts_after_the_signal(tmp_path, monkeypatch):
    """dvc ignores Ctrl-C while a stage runs; a stage that ends normally just as the signal
    comes lets dvc start the next one. ``stages.repro.dvc`` sends the signal again until dvc
    exits, so that next stage is stopped too (before: it ran to its end)."""
    import signal
    import threading
    import time

    from stages import repro

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "second-stage-finished"
    # the stage that finishes despite the signal, then the one dvc starts next
    ready = tmp_path / "first-stage-ignores-ctrl-c"
    finishing = (
        "import pathlib, signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        f"pathlib.Path({str(ready)!r}).touch(); time.sleep(1)"
    )
    second = f"import pathlib, time; time.sleep(20); pathlib.Path({str(marker)!r}).touch()"
    (bin_dir / "dvc").write_text(
        f"#!{sys.executable}\n"
        "import signal, subprocess, sys\n"
        "def stage(code):\n"  # as dvc runs a stage: Ctrl-C ignored by dvc while it runs
        "    p = subprocess.Popen([sys.executable, '-c', code])\n"
        "    signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "    try:\n"
        "        return p.wait()\n"
        "    finally:\n"
        "        signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        f"stage({finishing!r})\n"
        f"sys.exit(stage({second!r}))\n"
    )
    (bin_dir / "dvc").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")

    def stop_when_ready() -> None:  # the first stage runs (and repro.dvc's handler is set)
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=stop_when_ready, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        repro.dvc("repro")
    assert stop.value.code == 130
    assert time.monotonic() - started < 10 and not marker.exists()


def test_waiting_for_dvc_does_not_wake_this_process(tmp_path, monkeypatch):
    """While dvc runs, ``stages.repro.dvc`` sleeps until it exits (a pidfd): its thread is
    woken a few times, not ~20 times a second as ``Popen.wait(timeout)`` polled beside the
    training step, and the exit status still comes through."""
    import threading

    from stages import repro

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dvc").write_text("#!/bin/sh\nsleep 1.5\nexit 3\n")
    (bin_dir / "dvc").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    status = Path(f"/proc/self/task/{threading.get_native_id()}/status")

    def wakeups() -> int:
        line = next(x for x in status.read_text().splitlines() if x.startswith("voluntary_ctxt"))
        return int(line.split()[1])

    before = wakeups()
    with pytest.raises(SystemExit) as failed:
        repro.dvc("repro")
    assert failed.value.code == 3
    assert wakeups() - before < 10  # polling: ~30 in 1.5 s


def test_state_save_skips_files_of_a_stage_still_running(tmp_path, monkeypatch):
    """Side by side (pipeline.cluster.parallel), the state is saved after one stage's commit
    while another stage writes: its temporaries are skipped and a file that vanishes between
    the listing and the copy is not an error (the two-node run of issue 24 failed on one)."""
    project, store, rel = tmp_path / "p", Store(str(tmp_path)), Path("state")
    fid = project / "work" / "fid" / "v"
    fid.mkdir(parents=True)
    (project / "dvc.lock").write_text("schema: '2.0'\n")
    (fid / "stats.pt").write_bytes(b"s")
    (fid / ".stats.pt.ab12.tmp.part").write_bytes(b"partial")  # being written
    listed = durable._files

    def listing_then_vanish(folder, names):
        found = listed(folder, names)
        (fid / "stats.pt").unlink()  # the running stage replaces its file meanwhile
        return found

    monkeypatch.setattr(durable, "_files", listing_then_vanish)
    assert durable.save_state(project, store, rel) == len("schema: '2.0'\n")
    saved = sorted(p.name for p in (tmp_path / "state").rglob("*") if p.is_file())
    assert saved == ["dvc.lock"]
