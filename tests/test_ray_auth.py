"""A local Ray listens on 127.0.0.1 only and refuses a client without its token.

Real components: the tests' session cluster (``init_local``, as every stage without an address
starts one) and a private ``ray start --head`` (``local_head``, as ``stages.repro --local-ray``
and the two-node tests start one) with a token file made for the test. ``ray job submit`` is run
three times against the head: without a token, with a wrong one (both refused: Ray's
authentication error, the job never runs) and with the head's token (the job runs); a stage's
driver (``init_ray`` with the head's address, RAY_AUTH_MODE=token) without the token stops with
one ``error:`` line.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import psutil
from repo_copy import BIN, env

from pipeline.cluster.raycluster import local_head

LOOPBACK = ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]")
ROOT = Path(__file__).resolve().parents[1]
DRIVER = """
import sys
from pipeline.cli import entry_point
from pipeline.cluster.raycluster import init_ray
from pipeline.config import RayConfig
entry_point(lambda argv: init_ray(RayConfig(address=sys.argv[1])))([])
"""


def listening(pids: set[int]) -> list[str]:
    """``address:port`` of every TCP socket the processes ``pids`` listen on (``ss -ltnp``)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [
        line.split()[3] for line in out.splitlines() if any(f"pid={pid}," in line for pid in pids)
    ]


def cluster_pids(marker: str) -> set[int]:
    """This process, its descendants and every process with ``marker`` on its command line."""
    pids = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in arg for arg in p.info["cmdline"] or ()):
                pids |= {p.pid, *(c.pid for c in p.children(recursive=True))}
        except psutil.Error:
            continue
    return pids


def only_loopback(sockets: list[str]) -> list[str]:
    """The sockets of ``sockets`` that listen beyond the loopback address (0.0.0.0, *, a LAN)."""
    return [s for s in sockets if s.rsplit(":", 1)[0] not in LOOPBACK]


def test_a_local_cluster_started_in_process_listens_on_loopback_only(ray_session):
    """The session's cluster (``init_local``): GCS, raylet, workers, agents, dashboard."""
    ray = ray_session
    assert ray.get(ray.remote(lambda: 1).remote()) == 1  # a worker (its own gRPC server) runs
    session = ray._private.worker._global_node.get_session_dir_path()
    sockets = listening(cluster_pids(session))
    assert len(sockets) >= 4, sockets  # GCS, raylet (2), a worker at least
    assert only_loopback(sockets) == [], sockets
    assert ray._private.worker._global_node.node_ip_address == "127.0.0.1"


def submit(dashboard_url: str, job_env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [BIN / "ray", "job", "submit", "--address", dashboard_url, "--",
           "python", "-c", "print('the job ran')"]  # fmt: skip
    return subprocess.run(cmd, env=job_env, capture_output=True, text=True, timeout=300)


def test_a_private_head_listens_on_loopback_and_refuses_jobs_without_its_token(tmp_path):
    token = tmp_path / "token"  # made for this test, removed with tmp_path
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    home = tmp_path / "home"  # no ~/.ray/auth_token to fall back on
    home.mkdir()
    base = {k: v for k, v in env(HOME=str(home)).items() if not k.startswith("RAY_AUTH")}
    with local_head(1, env={**base, "RAY_AUTH_TOKEN_PATH": str(token)}) as head:
        refused = []
        for client in (
            base,  # Ray's default client: no token mode, no token
            {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)},
        ):
            job = submit(head.dashboard_url, client)
            assert job.returncode != 0, job.stdout + job.stderr
            refused.append(job.stdout + job.stderr)
        assert all("AuthenticationError" in out for out in refused), refused

        driver = subprocess.run(  # a stage's driver in token mode without the token: one line
            [BIN / "python", "-c", DRIVER, head.address], env={**base, "RAY_AUTH_MODE": "token"},
            cwd=ROOT,
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        errors = [x for x in driver.stderr.splitlines() if x.startswith("error:")]
        assert driver.returncode == 2 and len(errors) == 1, driver.stdout + driver.stderr
        assert "refused this process" in errors[0] and "RAY_AUTH_TOKEN" in errors[0]
        assert "Traceback" not in driver.stderr

        ok = submit(head.dashboard_url, {**base, "RAY_AUTH_MODE": "token",
                                         "RAY_AUTH_TOKEN_PATH": str(token)})  # fmt: skip
        assert ok.returncode == 0 and "succeeded" in ok.stdout, ok.stdout + ok.stderr
        assert "the job ran" in ok.stdout
        sockets = listening(cluster_pids(str(head.temp_dir)))  # every component is up by now
        assert len(sockets) >= 4 and only_loopback(sockets) == [], sockets
    print(f"\nprivate head sockets: {sorted(sockets)}; refused: {refused[0].strip()[-300:]}")


def test_the_token_file_ray_creates_by_default_is_private(tmp_path, monkeypatch):
    """``ensure_token``: with no token given, Ray's default file is made, user-only (0600);
    one that exists is kept; a token given in the environment makes none."""
    from pipeline.cluster.raycluster import default_token_path, ensure_token

    monkeypatch.setenv("HOME", str(tmp_path))
    ensure_token({"RAY_AUTH_TOKEN_PATH": "/elsewhere"})
    assert not Path(default_token_path()).exists()
    ensure_token({"RAY_AUTH_MODE": "disabled"})
    assert not default_token_path().exists()
    ensure_token({})
    path = default_token_path()
    assert path == tmp_path / ".ray" / "auth_token"
    first = path.read_text()
    assert len(first) == 64 and int(first, 16) >= 0
    assert path.stat().st_mode & 0o777 == 0o600
    ensure_token({"RAY_AUTH_MODE": "token"})
    assert path.read_text() == first
    assert [p.name for p in path.parent.iterdir()] == ["auth_token"]  # no temporary left
