"""pipeline.cluster.raycluster's helpers that need no cluster."""

from __future__ import annotations

import socket

from pipeline.cluster.raycluster import free_ports


def test_free_ports_are_distinct_and_bindable():
    """A private head gets its GCS, dashboard, agent and client ports at once: never the same
    port twice (Ray refuses to start then), and each one free to bind."""
    ports = free_ports(64)
    assert len(set(ports)) == 64
    for port in ports[:8]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_head_without_dashboard_is_ready_when_ray_start_logs_it(tmp_path):
    """``local_head(dashboard=False)`` has no URL to poll: it waits for ``ray start``'s line,
    and a ``ray start`` that exits first is one error with its status."""
    import subprocess

    import pytest

    from pipeline.cluster.raycluster import STARTED, wait_for_line
    from pipeline.errors import UserError

    log = tmp_path / "ray-start.log"
    proc = subprocess.Popen(["sh", "-c", f"sleep 0.3; echo '{STARTED}' > {log}; sleep 30"])
    try:
        wait_for_line(log, STARTED, proc, seconds=20)
    finally:
        proc.kill()
        proc.wait()
    failed = subprocess.Popen(["sh", "-c", "exit 3"])
    with pytest.raises(UserError, match="exited with status 3"):
        wait_for_line(tmp_path / "none.log", STARTED, failed, seconds=20)
