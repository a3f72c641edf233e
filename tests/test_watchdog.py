"""A SIGKILLed driver leaves nothing behind: the watchdog stops its local cluster and children.

Ray's own fate sharing stops the GCS server and raylet of a ``ray.init`` cluster with its driver,
but not what runs outside the driver's process group (the test's stand-in: a child in a session
of its own). pipeline.cluster.watchdog stops every recorded descendant by pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
from repo_copy import ROOT, env

# A stage's driver: a local Ray cluster, and a child outside its process group as Ray's worker
# processes are (each leads a group of its own), which a signal to the group cannot reach.
DRIVER = """
import os, pathlib, subprocess, time
from pipeline.config import RayConfig
from pipeline.cluster.raycluster import init_ray
init_ray(RayConfig(num_cpus=1, log_to_driver=False))
child = subprocess.Popen(["sleep", "600"], start_new_session=True)
seen = pathlib.Path(os.environ["DDPM_WATCHDOG_SEEN"])
deadline = time.monotonic() + 120
while str(child.pid) not in (seen.read_text().split() if seen.exists() else []):
    assert time.monotonic() < deadline, "the watchdog never saw the child"
    time.sleep(0.05)  # until the watchdog has seen the child (no fixed sleep)
print("ready", flush=True)
time.sleep(600)
"""


def command(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_sigkill_of_a_stage_process_group_stops_its_local_ray_cluster(tmp_path):
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER],
        cwd=ROOT,
        env=env(PYTHONPATH=str(ROOT), DDPM_WATCHDOG_SEEN=str(tmp_path / "seen")),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as dvc's stage has
    )
    try:
        assert driver.stdout.readline().strip() == "ready"
        tree = {p: command(p) for p in psutil.Process(driver.pid).children(recursive=True)}
        ray_procs = [p for p, cmd in tree.items() if "pipeline.cluster.watchdog" not in cmd]
        names = " ".join(tree.values())
        assert "gcs_server" in names and "raylet" in names  # a real local cluster
        assert "sleep 600" in names
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(10)
        watchdogs = [p for p, cmd in tree.items() if "pipeline.cluster.watchdog" in cmd]
        assert len(watchdogs) == 1
        deadline = time.monotonic() + 20
        while alive(ray_procs + watchdogs) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(ray_procs), [command(p) for p in alive(ray_procs)]
        assert not alive(watchdogs)  # it exits once its work is done
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
