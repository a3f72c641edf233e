"""A two-node Ray cluster on this machine whose nodes share one folder only (test helper).

The head is ``ray start --head`` on 127.0.0.1 (:func:`pipeline.cluster.raycluster.local_head`, 1
CPU). The second node runs ``ray start --address ... --block`` (1 CPU) inside its own mount
namespace (``unshare --mount --propagation private --fork``, needs root) with private tmpfs mounts
over /tmp, /dev/shm and the project checkout: it cannot see the head's files, its session folder,
the job's working directory or the test's temp folders. Only the Python environment (bind-mounted
back onto its path when it lives inside the checkout, as ``.venv`` does in CI) and one "cluster
storage" folder outside /tmp and the checkout (standing in for NFS) are visible to both.

With one CPU a node, two 1-CPU training workers or blocks land one on each node. Every process
started here is stopped by its pid (the head's process group, then the node's), never
``ray stop``.

Unlike a local run's, the head is not in Ray's single-machine mode (a node cannot join that): its
servers listen on the machine's address as on a real cluster, and so the cluster runs with Ray's
token authentication (RAY_AUTH_MODE=token): a token made for the
cluster (256 random bits) in a file of its own, user-only, in a private folder outside /tmp (both
nodes read it through RAY_AUTH_TOKEN_PATH, as a mounted Secret would be read) and removed with
the cluster. Clients pass ``TwoNodes.client_env`` (``ray job submit``, drivers) or
``TwoNodes.headers`` (Ray's HTTP clients in this process: :func:`job_client`,
:func:`state_list`); nothing without the token gets in.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from repo_copy import BIN, ROOT, env, free_port, free_ports

from pipeline.cluster.raycluster import LOCAL_ONLY, local_head, wait_for_url

STORAGE_PARENT = Path("/var/tmp")  # outside /tmp and the checkout: visible to both nodes


@dataclass(frozen=True)
class TwoNodes:
    """The cluster: the head's addresses and the shared storage folder."""

    address: str  # GCS address (ray.init)
    dashboard_url: str  # job API (ray job submit --address)
    storage: Path
    node_log: Path
    token_file: Path  # the cluster's token (RAY_AUTH_TOKEN_PATH)

    @property
    def client_env(self) -> dict[str, str]:
        """What a client process adds to its environment to be let in."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file)}

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers of a request to the job and state API that is let in."""
        token = self.token_file.read_text().strip()
        return {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}


def job_client(cluster: TwoNodes):
    """Ray's JobSubmissionClient for ``cluster``, with its token."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard_url, headers=cluster.headers)


def state_list(cluster: TwoNodes, resource: str, **options) -> list:
    """Ray's state API: ``list`` of ``resource`` ("nodes", "tasks", "actors") with the token;
    ``options`` are ListApiOptions' (limit, detail, timeout)."""
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(address=cluster.dashboard_url, headers=cluster.headers)
    return client.list(
        StateResource(resource), options=ListApiOptions(**options), raise_on_missing_output=False
    )


@contextlib.contextmanager
def cluster_token() -> Iterator[Path]:
    """A new token in a file of its own (0600, in a 0700 folder under /var/tmp, which both nodes
    see); removed on exit."""
    folder = Path(tempfile.mkdtemp(prefix="ddpm-token-", dir=STORAGE_PARENT))
    try:
        path = folder / "token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def can_run() -> str | None:
    """Why a two-node cluster cannot be simulated here, or None."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs Linux and root (unshare --mount)"
    if not shutil.which("unshare") or not shutil.which("mount"):
        return "needs unshare and mount"
    return None


def node_script(
    address: str, checkout: Path, venv: Path, temp: str, cpus: int = 1, gpus: int = 0
) -> str:
    """The second node's shell script (run inside the new mount namespace).

    ``temp`` (in its private /tmp) is its Ray temp dir: unique, so that its processes can be
    found by their command line. ``gpus``: fake GPUs it declares to Ray (``--num-gpus``; the
    work they get runs on the CPU under DDPM_FAKE_GPUS=1, pipeline.cluster.devices).
    """
    ray = venv / "bin" / "ray"
    keep = "/dev/shm/ddpm-venv"
    agent, metrics, runtime_env = free_ports(3)
    start = [
        str(venv / "bin" / "python"), str(ray), "start", f"--address={address}", "--block",
        f"--num-cpus={cpus}", f"--num-gpus={gpus}", "--node-ip-address=127.0.0.1",
        "--disable-usage-stats", f"--temp-dir={temp}",
        f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}", "--min-worker-port=20000",
        "--max-worker-port=29999",
    ]  # fmt: skip
    q = shlex.quote
    return "\n".join(
        [
            "set -e",
            "mount -t tmpfs tmpfs /dev/shm",
            f"mkdir -p {keep} && mount --bind {q(str(venv))} {keep}",
            "mount -t tmpfs tmpfs /tmp",
            f"if [ -d {q(str(checkout))} ]; then mount -t tmpfs tmpfs {q(str(checkout))}; fi",
            f"if [ ! -x {q(str(venv / 'bin' / 'python'))} ]; then",
            f"  mkdir -p {q(str(venv))} && mount --bind {keep} {q(str(venv))}",
            "fi",
            f"test ! -e {q(str(checkout / 'params.yaml'))}",  # the checkout is hidden
            f"exec {shlex.join(start)}",
        ]
    )


@contextlib.contextmanager
def two_nodes(
    head_cpus: int = 1, timeout_s: float = 120, node_cpus: int = 1, node_gpus: int = 0
) -> Iterator[TwoNodes]:
    """Start the head and the hidden second node (``node_cpus`` CPUs, ``node_gpus`` fake GPUs
    declared to Ray); stop both (by pid) on exit."""
    storage = Path(tempfile.mkdtemp(prefix="ddpm-storage-", dir=STORAGE_PARENT))
    venv = Path(sys.prefix).resolve()
    proc = None
    try:
        with (
            cluster_token() as token,
            local_head(head_cpus, env=auth_env(token), single_machine=False) as head,
        ):
            node_log = head.temp_dir / "node2.log"
            temp = f"/tmp/ddpm-node2-{os.urandom(6).hex()}"
            script = node_script(head.address, ROOT, venv, temp, node_cpus, node_gpus)
            with open(node_log, "wb") as log:
                proc = subprocess.Popen(
                    ["unshare", "--mount", "--propagation", "private", "--fork",
                     "bash", "-c", script],
                    env=auth_env(token), stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            wait_for_nodes(head.address, 2, proc, node_log, timeout_s, auth_env(token))
            yield TwoNodes(head.address, head.dashboard_url, storage, node_log, token)
    finally:
        if proc is not None:
            stop_node(proc, temp)
        shutil.rmtree(storage, ignore_errors=True)


def auth_env(token: Path) -> dict[str, str]:
    """The tests' environment with the cluster's token (RAY_AUTH_TOKEN wins over a token file:
    it is dropped) and nothing from an earlier local cluster (Ray's single-machine mode would
    stop the second node from joining)."""
    base = {k: v for k, v in env().items() if k not in ("RAY_AUTH_TOKEN", LOCAL_ONLY)}
    return {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def stop_node(proc: subprocess.Popen, temp: str) -> None:
    """SIGKILL the node: its process group, its descendants and whatever names its temp dir."""
    found = [p for p in psutil.process_iter(["cmdline"]) if _names(p, temp)]
    with contextlib.suppress(psutil.Error):
        found += psutil.Process(proc.pid).children(recursive=True)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in found:
        with contextlib.suppress(psutil.Error):
            p.kill()
    proc.wait(30)


def _names(p: psutil.Process, temp: str) -> bool:
    with contextlib.suppress(psutil.Error):
        return any(temp in arg for arg in p.info["cmdline"] or ())
    return False


def wait_for_nodes(
    address: str,
    count: int,
    proc: subprocess.Popen,
    log: Path,
    timeout_s: float,
    client_env: dict[str, str],
) -> None:
    """Wait until ``count`` nodes are alive (asked through a short-lived driver that runs with
    ``client_env``)."""
    code = (
        "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the second node exited ({proc.returncode}): {log.read_text()[-2000:]}")
        out = subprocess.run(
            [BIN / "python", "-c", code, address], env=client_env, capture_output=True, text=True
        )
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1)
    pytest.fail(f"the second node did not join in {timeout_s:.0f} s: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def mlflow_server(
    folder: Path,
    port: int | None = None,
    app: tuple[str, ...] = (),
    server_env: dict[str, str] | None = None,
) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (``port``, default a free one) with a SQLite store
    in ``folder``; yields its URI. ``app``: more arguments (``--app-name basic-auth``),
    ``server_env``: more environment."""
    port = port or free_port()
    proc = subprocess.Popen(
        [BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "server-artifacts"), *app],
        env=env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **(server_env or {})),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_url(f"http://127.0.0.1:{port}/health", proc, 240, "mlflow server")
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


@dataclass(frozen=True)
class AuthServer:
    """An MLflow server with MLflow's basic-auth app: its URI and the environment (MLflow reads
    the credentials from it) of its admin and of a user made for the test."""

    uri: str
    admin: dict[str, str]
    user: dict[str, str]


def credentials(username: str, password: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_USERNAME": username, "MLFLOW_TRACKING_PASSWORD": password}


@contextlib.contextmanager
def auth_mlflow_server(folder: Path) -> Iterator[AuthServer]:
    """``mlflow server --app-name basic-auth`` on 127.0.0.1: users in a SQLite database in
    ``folder`` (basic_auth.ini through MLFLOW_AUTH_CONFIG_PATH), default permission READ, an
    admin with a random password, and a user ``ddpm-test`` (random password) created through
    the REST API by the admin; a new experiment's creator may edit it."""
    ini = folder / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{folder / 'auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    admin = credentials("admin", secrets.token_urlsafe(18))
    server_env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin["MLFLOW_TRACKING_PASSWORD"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }
    with mlflow_server(folder, app=("--app-name", "basic-auth"), server_env=server_env) as uri:
        user = credentials("ddpm-test", secrets.token_urlsafe(18))
        basic = base64.b64encode(f"admin:{admin['MLFLOW_TRACKING_PASSWORD']}".encode()).decode()
        request = urllib.request.Request(
            f"{uri}/api/2.0/mlflow/users/create",
            data=json.dumps(
                {"username": "ddpm-test", "password": user["MLFLOW_TRACKING_PASSWORD"]}
            ).encode(),
            headers={"Authorization": f"Basic {basic}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            assert answer.status == 200
        yield AuthServer(uri, admin, user)
