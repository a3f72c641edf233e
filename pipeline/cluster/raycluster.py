"""Connecting to Ray: an existing cluster when an address is known, else a local one.

RAY_ADDRESS (set by ``ray job submit`` drivers and by users) wins over params' ``ray.address``.
A bare ``ray.init(num_cpus=...)`` fails inside job drivers, so a new local instance is always
asked for explicitly with ``address="local"``.

A local cluster (``init_ray`` without an address, ``local_head``) listens on 127.0.0.1 only and
keeps Ray's token authentication (docs/running.md, "Authentication"): Ray's single-machine mode
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, Ray's default on macOS and Windows) gives the node the
address 127.0.0.1 and binds every server there (GCS, raylet, workers, agents, dashboard, metrics);
``RAY_AUTH_MODE=token`` is what ``ray.init`` turns on by default for a new cluster, with its token
in ``~/.ray/auth_token`` (created here, readable by the user only, when no token is given).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ray

from pipeline.cluster.watchdog import watch
from pipeline.config import RayConfig
from pipeline.errors import UserError
from pipeline.uri import redact_uri


def ray_address(cfg: RayConfig) -> str | None:
    """The cluster to join, or None for a new local one."""
    return os.environ.get("RAY_ADDRESS") or cfg.address


LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-machine mode (127.0.0.1)
AUTH_MODE = "RAY_AUTH_MODE"
TOKEN_VARIABLES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # where Ray looks first for a token
AUTH_ON_NOTICE = "Token authentication is enabled for this Ray cluster"  # Ray's warning


def default_token_path() -> Path:
    """Ray's default token file (after RAY_AUTH_TOKEN and RAY_AUTH_TOKEN_PATH)."""
    return Path.home() / ".ray" / "auth_token"


def ensure_token(env: Mapping[str, str]) -> None:
    """With token authentication on in ``env`` and no token given there (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH), create Ray's default token file when it is missing: 256 random bits,
    mode 0600 (Ray's own ``ray.init`` creates it readable by everyone), written under a temporary
    name and linked into place, so that a concurrent run never reads it half written."""
    if env.get(AUTH_MODE, "token").lower() != "token" or any(env.get(k) for k in TOKEN_VARIABLES):
        return
    path = default_token_path()
    if path.is_file() and path.stat().st_size > 0:
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = path.with_name(f".auth_token.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        with contextlib.suppress(FileExistsError):  # another run made one first: theirs
            os.link(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def local_ray_env(
    env: Mapping[str, str] | None = None, single_machine: bool = True
) -> dict[str, str]:
    """``env`` (default os.environ) for a local Ray cluster and the processes that join it:
    Ray on 127.0.0.1 only (``single_machine``; else Ray's default addresses, for a head other
    nodes join), and token authentication on unless ``env`` sets RAY_AUTH_MODE (set
    explicitly, Ray logs no notice about it)."""
    base = {k: v for k, v in (os.environ if env is None else env).items() if k != LOCAL_ONLY}
    return {AUTH_MODE: "token", **base, **({LOCAL_ONLY: "0"} if single_machine else {})}


class _DropAuthOnNotice(logging.Filter):
    """Drops Ray's warning that token authentication is on (it is meant to be): only that one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(AUTH_ON_NOTICE)


@contextlib.contextmanager
def _single_machine() -> Iterator[None]:
    """Ray's single-machine mode for a ``ray.init`` in this process: Ray read the variable when
    it was imported, so its constant is set too (the cluster's processes read the variable)."""
    from ray._private import ray_constants

    saved = os.environ.get(LOCAL_ONLY), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOCAL_ONLY] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]
        if saved[0] is None:
            os.environ.pop(LOCAL_ONLY, None)
        else:
            os.environ[LOCAL_ONLY] = saved[0]


def init_local(**kwargs: Any) -> None:
    """``ray.init(address="local", **kwargs)`` on 127.0.0.1 with Ray's default authentication
    (token, as ray.init turns on for a new cluster; its notice about that is dropped)."""
    ensure_token(os.environ)
    notices = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropAuthOnNotice) for f in notices.filters):
        notices.addFilter(_DropAuthOnNotice())
    with _single_machine():
        ray.init(address="local", **kwargs)


def connect(address: str, **kwargs: Any) -> None:
    """``ray.init(address=address, **kwargs)``; a refused or missing token is one UserError."""
    from ray.exceptions import AuthenticationError

    try:
        ray.init(address=address, **kwargs)
    except AuthenticationError as e:
        raise UserError(
            f"the Ray cluster at {redact_uri(address)} refused this process: {e.message} (set "
            "RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN or a file named by "
            "RAY_AUTH_TOKEN_PATH; docs/running.md, Authentication)"
        ) from None


def init_ray(cfg: RayConfig) -> None:
    """Initialise Ray once per process (a no-op when already initialised)."""
    if ray.is_initialized():
        return
    common = {
        "log_to_driver": cfg.log_to_driver,
        "logging_level": logging.WARNING,
        "configure_logging": True,
    }
    address = ray_address(cfg)
    if address:
        connect(address, **common)
    else:
        init_local(num_cpus=cfg.num_cpus, **common)
        watch()  # the local cluster dies with this process, even when it is SIGKILLed


def alive_nodes(cfg: RayConfig) -> int:
    """How many alive nodes the cluster at ``ray_address(cfg)`` has (1 without an address: a
    new local cluster is one node). Connects for the count and disconnects."""
    address = ray_address(cfg)
    if not address:
        return 1
    if ray.is_initialized():
        return sum(1 for n in ray.nodes() if n.get("Alive"))
    connect(address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        return sum(1 for n in ray.nodes() if n.get("Alive"))
    finally:
        ray.shutdown()


def check_single_node(cfg: RayConfig, has_storage: bool) -> None:
    """UserError when the cluster has several alive nodes and no cluster storage is set: ranks
    and tasks on the other nodes could not see the job's working directory (one line, before
    any work, instead of a late failure on a remote rank)."""
    if has_storage:
        return
    nodes = alive_nodes(cfg)
    if nodes > 1:
        raise UserError(
            f"the Ray cluster at {redact_uri(str(ray_address(cfg)))} has {nodes} alive nodes and "
            "no cluster storage is set: set cluster.storage in params.yaml or "
            "DDPM_CLUSTER_STORAGE (a folder every node mounts at the same path, or s3://..., "
            "gs://...; see docs/cluster.md)"
        )


@dataclasses.dataclass(frozen=True)
class LocalHead:
    """A running ``ray start --head`` cluster: its GCS address and job (dashboard) URL."""

    address: str  # for RAY_ADDRESS / ray.init
    dashboard_url: str  # for ray job submit --address
    temp_dir: Path


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct unused TCP ports on 127.0.0.1.

    All are held open until every one is chosen: ports taken one after another can repeat (the
    kernel may hand a just-closed port out again), and Ray refuses a port given to two of its
    components.
    """
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def wait_for_url(url: str, proc: subprocess.Popen, seconds: float, what: str) -> None:
    """Wait until ``url`` answers, any HTTP status included (a server with authentication on
    answers 401); ``what`` (the server ``proc`` runs) names it in errors."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"{what} exited with status {proc.returncode}")
        with contextlib.suppress(OSError):
            with contextlib.suppress(urllib.error.HTTPError):  # an answer too: it is up
                urllib.request.urlopen(url, timeout=2)
            return
        time.sleep(0.25)
    raise UserError(f"{what} did not answer at {url} within {seconds:.0f} s")


STARTED = "Ray runtime started."  # what ``ray start`` logs once every component is up


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, seconds: float) -> None:
    """Wait until ``text`` appears in the log that ``proc`` (``ray start --head``) writes."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if text in log.read_text(errors="replace"):
                return
        if proc.poll() is not None:
            raise UserError(f"ray start --head exited with status {proc.returncode}")
        time.sleep(0.25)
    raise UserError(f"ray start --head did not log {text!r} within {seconds:.0f} s")


def _kill_cluster(proc: subprocess.Popen | None, temp: Path) -> None:
    """SIGKILL the head's process group and every process with ``temp`` on its command line."""
    import psutil

    if proc is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(temp) in arg for arg in p.info["cmdline"] or ()):
                p.kill()
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)


@contextlib.contextmanager
def _exit_on_termination() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into SystemExit, so that ``finally`` blocks run (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    saved = {sig: signal.signal(sig, _exit) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def local_head(
    num_cpus: int | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 120,
    dashboard: bool = True,
    single_machine: bool = True,
) -> Iterator[LocalHead]:
    """Start a private Ray head on 127.0.0.1 for the duration of the block, then stop it.

    Every stage of a ``dvc repro`` joins it through RAY_ADDRESS instead of starting (and
    stopping) a local cluster of its own, which saves ~10 s per Ray stage. Its own ports (GCS,
    dashboard, agent, client server) and temp dir; on exit, including SIGTERM and SIGHUP, every
    process of this cluster (they all carry the temp dir on their command line) is killed. The
    temp dir (Ray's session logs, ``ray-start.log``) is removed after a clean run and kept, with
    its path in the error, when the cluster failed to start.

    Every server of the head listens on 127.0.0.1 only and clients need its token
    (:func:`local_ray_env`; RAY_AUTH_MODE in ``env``, default os.environ, is kept): the clients
    get the same environment (RAY_AUTH_MODE=token; RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH if
    ``env`` names the token, else Ray's default token file, created when missing).
    ``single_machine=False`` (a head that other nodes join, tests/two_node.py): Ray's default
    addresses (the node's LAN address; a joining node resolves 127.0.0.1 to it), the token
    still required.

    ``dashboard=False`` starts no dashboard (no ``ray job submit`` to this head; its
    ``dashboard_url`` is empty): its processes take ~2-3% of a 2-core CPU while idle, taken
    from every stage of the run (benchmarks/README.md, "The Ray head beside the stages").
    """
    temp = Path(tempfile.mkdtemp(prefix="ddpm-ray-", dir="/tmp"))  # short: unix socket paths
    ray_bin = Path(sys.executable).parent / "ray"
    port, dashboard_port, agent, client = free_ports(4)
    cmd = [
        str(ray_bin if ray_bin.exists() else "ray"), "start", "--head", "--block",
        f"--temp-dir={temp}", f"--port={port}", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",  # (a LAN address unless single_machine: Ray's rule)
        f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={agent}",
        f"--ray-client-server-port={client}", "--disable-usage-stats",
        *([f"--num-cpus={num_cpus}"] if num_cpus else []),
        *([] if dashboard else ["--include-dashboard=false"]),
    ]  # fmt: skip
    env = local_ray_env(env, single_machine)
    ensure_token(env)
    proc = None
    started = False
    with _exit_on_termination():
        try:
            try:
                with open(temp / "ray-start.log", "wb") as log:
                    proc = subprocess.Popen(
                        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
            except OSError as e:
                raise UserError(f"cannot start a local Ray head ({cmd[0]}): {e}") from None
            watch()  # SIGKILL of this process skips the finally below: the head still stops
            url = f"http://127.0.0.1:{dashboard_port}" if dashboard else ""
            try:
                if dashboard:
                    wait_for_url(f"{url}/api/version", proc, timeout_s, "ray start --head")
                else:
                    wait_for_line(temp / "ray-start.log", STARTED, proc, timeout_s)
            except UserError as e:
                raise UserError(f"{e}; its log: {temp / 'ray-start.log'}") from None
            started = True
            yield LocalHead(f"127.0.0.1:{port}", url, temp)
        finally:
            _kill_cluster(proc, temp)
            if started:
                shutil.rmtree(temp, ignore_errors=True)
