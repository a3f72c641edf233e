"""A stage server: stage processes forked from one that has torch, Ray, MLflow... imported.

Every DVC stage is a new ``python -m stages.X`` process, and each paid its imports again: torch
~1.3 s, MLflow ~1.5 s, Ray ~0.4 s, torch-fidelity (torchvision, torch._dynamo) ~1.6 s on a
2-core CPU, i.e. 3-5 s of every train, sample and evaluate stage. ``stages.repro`` starts one
server for its run (:func:`stage_server`), which imports those once and then listens on a unix
socket named by ``DDPM_STAGE_SERVER``. A stage's process (the *client*, started by ``dvc repro``
as before, with the same command) finds the variable in :func:`pipeline.cli.run_stage` and hands
its module, arguments, working directory, environment and standard streams (the file descriptors
themselves) to the server, which forks a child that runs the stage as ``__main__`` would have.
The client waits and exits with the child's status, so to DVC nothing changed.

What a stage process guaranteed is kept:

- **Stops.** The child leads a process group of its own; the client forwards SIGTERM, SIGINT
  and SIGHUP to that group (what ``stages.repro`` sends dvc's group reaches the client), and
  exits as the child did (with its code, or killed by the same signal). If the client dies
  (SIGKILL), the child notices its end of the connection closing and SIGKILLs its group: a
  SIGKILLed stage is gone, as before.
- **Same program.** The child takes the client's environment, working directory, arguments and
  standard streams; Python's and numpy's global random states are reseeded from the OS as in a
  new process. The server is refused (the client runs the stage itself, nothing else changes)
  when it cannot give the same program: variables that libraries read at import time
  (``OMP_*``, ``TORCH*``, ``RAY_*``, ``PYTHON*``, ``LD_*``, ...) differ from the server's, the
  working directory is not the server's ``sys.path[0]``, a source file it imported has changed
  since, or it is not answering.
- **No threads before fork.** The server imports and never computes; if an import left a second
  Python thread running, it does not serve (forking a threaded process can deadlock the child).

``DDPM_STAGE_SERVER=off`` in the environment of ``stages.repro`` turns it off.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ENV = "DDPM_STAGE_SERVER"  # the socket's path, in a stage's environment
PRELOAD_ENV = "DDPM_STAGE_SERVER_PRELOAD"  # the modules to import, in the server's
# Variables read when a library is imported (or the interpreter starts): a client whose values
# differ from the server's runs the stage itself.
IMPORT_TIME = ("OMP_", "MKL_", "KMP_", "OPENBLAS_", "GOMP_", "TORCH", "PYTORCH", "CUDA", "NVIDIA",
               "RAY_", "LD_", "PYTHON", "MALLOC", "GRPC_")  # fmt: skip
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_child = False  # True in a forked stage: it never hands itself on again


# --------------------------------------------------------------------------- the client side


AT_INIT = ("RAY_ADDRESS",)  # read when used, not at import: a client may have its own


def import_time_env(env: dict[str, str] | os._Environ) -> dict[str, str]:
    """The variables of ``env`` that libraries read at import time (IMPORT_TIME prefixes)."""
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME) and k not in (ENV, *AT_INIT)}


def delegate(module: str, argv: list[str]) -> int | None:
    """Run stage ``module`` with ``argv`` in a child of the server named by DDPM_STAGE_SERVER.

    Returns the child's exit code (a negative number: killed by that signal), or None when there
    is no server to use (not set, not answering, or refusing this client): then the caller runs
    the stage itself. Signals that stop a stage are forwarded to the child's process group while
    waiting.
    """
    path = os.environ.get(ENV)
    if _child or not path or path == "off":
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    request = {"module": module, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
    with sock:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            socket.send_fds(sock, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
            reader = sock.makefile("rb")
            answer = json.loads(reader.readline() or b"null")
        except (OSError, ValueError):
            return None
        if not answer or "pid" not in answer:  # refused: {"refused": why}
            if answer:
                print(f"stage server: {answer.get('refused')}; running here", file=sys.stderr)
            return None
        return _wait_forwarding(reader, int(answer["pid"]))


def _wait_forwarding(reader, pid: int) -> int:
    """Forward stop signals to process group ``pid`` until the server reports its status."""

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    try:
        line = reader.readline()
    except OSError:
        line = b""
    if not line:  # the server went away without a status
        print(f"stage server: lost stage process {pid}", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        return 1
    return int(json.loads(line)["status"])


def exit_as(code: int) -> None:
    """End this process as the stage's child ended: its exit code, or killed by its signal."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        time.sleep(1)  # a signal that does not end the process: exit as a shell would report it
        os._exit(128 - code)
    os._exit(code)


# --------------------------------------------------------------------------- the server side


def _source_files() -> dict[str, float]:
    """mtime of every imported module file under this project (the server's first sys.path)."""
    root = Path(_root).resolve()
    seen: dict[str, float] = {}
    for mod in list(sys.modules.values()):
        file = getattr(mod, "__file__", None)
        if file and Path(file).resolve().is_relative_to(root) and "site-packages" not in file:
            with contextlib.suppress(OSError):
                seen[file] = os.stat(file).st_mtime
    return seen


def _threads() -> int:
    """Python threads of this process. (Native ones are there after the imports: torch's thread
    pool and pyarrow's jemalloc; both reset themselves in a forked child with pthread_atfork
    handlers, as PyTorch's DataLoader relies on when it forks workers after importing torch.)"""
    import threading

    return threading.active_count()


def _refusal(request: dict, env: dict[str, str], sources: dict[str, float]) -> str | None:
    """Why this server cannot run the request as a new process would, or None."""
    client = import_time_env(request["env"])
    for key, value in _set_by_imports.items():  # the client imported what set it, as we did
        if client.get(key) == value:
            del client[key]
    if client != env:
        keys = sorted(set(client.items()) ^ set(env.items()))
        return f"environment differs in {', '.join(sorted({k for k, _ in keys}))}"
    if Path(request["cwd"]).resolve() != Path(_root).resolve():
        return f"working directory {request['cwd']} is not the server's {_root}"
    for file, mtime in sources.items():
        with contextlib.suppress(OSError):
            if os.stat(file).st_mtime != mtime:
                return f"{file} changed since the server started"
    return None


def serve(path: str, preload: list[str]) -> None:
    """Import ``preload``, then fork a child per request on unix socket ``path`` until stopped
    (SIGTERM) or the process that started this server is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the stages through the clients
    global _root
    _root = sys.path[0]  # the project (``python -m`` put the working directory first); Ray's
    # import puts its own folder in front of it
    parent = os.getppid()
    started_with = dict(os.environ)  # what a new stage process would start with
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception as e:  # a stage that needs it fails as it would have, in its own run
            print(f"not preloaded {name}: {type(e).__name__}: {e}", flush=True)
    threads = _threads()
    if threads > 1:
        print(f"stage server: {threads} threads after the imports; not serving", file=sys.stderr)
        return
    env, sources = import_time_env(started_with), _source_files()
    # set by the imports themselves (torch-fidelity's torchvision sets TORCHINDUCTOR_CACHE_DIR):
    # a new process would have set them too, so the children get them where the client has none
    global _set_by_imports
    _set_by_imports = {k: v for k, v in os.environ.items() if k not in started_with}
    import gc

    gc.collect()
    gc.freeze()  # the children share the imported modules' pages instead of copying them
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)  # clients see the socket only once it listens
    global _selector
    _selector = selectors.DefaultSelector()  # the listener, and each running stage's pidfd
    _selector.register(listener, selectors.EVENT_READ, None)  # with (its pid, its connection)
    while os.getppid() == parent:
        for key, _ in _selector.select(timeout=1.0):
            if key.data is None:
                conn, _ = listener.accept()
                _start(conn, env, sources)
                continue
            pidfd, (pid, conn) = key.fd, key.data
            _selector.unregister(pidfd)
            _, status = os.waitpid(pid, 0)
            os.close(pidfd)
            code = os.waitstatus_to_exitcode(status)
            with contextlib.suppress(OSError), conn:
                conn.sendall(json.dumps({"status": code}).encode() + b"\n")


_selector: selectors.BaseSelector | None = None  # serve()'s: what a child must close
_set_by_imports: dict[str, str] = {}  # environment variables the preloaded imports set
_root = ""  # sys.path[0] as the server started: the project


def _start(conn: socket.socket, env: dict[str, str], sources: dict[str, float]) -> None:
    """Read a request from ``conn`` and fork its stage, registered with the selector."""
    try:
        conn.settimeout(10)
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        while not data.endswith(b"\n"):
            more = conn.recv(1 << 20)
            if not more:
                raise OSError("request cut short")
            data += more
        request = json.loads(data)
        conn.settimeout(None)
    except (OSError, ValueError):
        conn.close()
        return
    if len(fds) != 3 or (why := _refusal(request, env, sources)):
        for fd in fds:
            os.close(fd)
        print(f"refused {request.get('module')}: {why or 'no standard streams'}", flush=True)
        with contextlib.suppress(OSError), conn:
            conn.sendall(json.dumps({"refused": why or "no standard streams"}).encode() + b"\n")
        return
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _run_child(conn, request, fds)  # never returns
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    assert _selector is not None  # set by serve(), which calls this
    _selector.register(pidfd, selectors.EVENT_READ, (pid, conn))
    print(f"forked {request['module']} {' '.join(request['argv'])} as {pid}", flush=True)
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")


def _run_child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: become the stage's process and run it as ``__main__``."""
    global _child
    _child = True
    code = 1
    try:
        assert _selector is not None  # set by serve(), whose child this is
        # the server's ends: a child holding the listening socket would keep it "listening"
        # after the server is gone, and other clients' connections open after their stages end
        for key in list(_selector.get_map().values()):
            if key.data is None:
                assert isinstance(key.fileobj, socket.socket)
                key.fileobj.close()  # the listening socket
            else:
                os.close(key.fd)  # another stage's pidfd, and its client's connection
                key.data[1].close()
        _selector.close()
        os.setpgid(0, 0)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        _watch_client(conn)
        os.environ.clear()
        os.environ.update({**_set_by_imports, **request["env"]})
        os.environ.pop(ENV, None)
        os.chdir(request["cwd"])
        _reseed()
        import runpy

        sys.argv = [request["module"], *request["argv"]]
        sys.modules.pop(request["module"], None)  # preloaded: runpy would warn; runs anew anyway
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    except BaseException:
        sys.excepthook(*sys.exc_info())
    finally:
        with contextlib.suppress(BaseException):
            import threading

            threading._shutdown()  # type: ignore[attr-defined]  # as the interpreter's exit
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _watch_client(conn: socket.socket) -> None:
    """SIGKILL this stage's process group when the client's end of ``conn`` closes (the client
    was killed: a stage that outlived it would go on writing behind DVC's back)."""
    import threading

    def watch() -> None:
        with contextlib.suppress(OSError):
            while conn.recv(4096):
                pass
        with contextlib.suppress(OSError):
            os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="stage-client-watch", daemon=True).start()


def _reseed() -> None:
    """Fresh OS entropy for the global random states a new process would seed itself."""
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()


def wait_ready(env: dict[str, str], seconds: float) -> bool:
    """Wait up to ``seconds`` for the server of ``env`` to listen (its imports done); whether
    it does. Stages started before then simply run themselves."""
    path = env.get(ENV)
    deadline = time.monotonic() + seconds
    while path and path != "off" and time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.1)
    return bool(path and os.path.exists(path))


@contextlib.contextmanager
def stage_server(preload: list[str], env: dict[str, str] | None = None) -> Iterator[dict]:
    """Start a stage server importing ``preload`` for the block; yields the environment for the
    stages (``env`` or os.environ, with DDPM_STAGE_SERVER set), then stops the server by its pid.

    Nothing waits for the server: until its socket appears (after its imports) stages run
    themselves. With DDPM_STAGE_SERVER=off in ``env`` no server is started.
    """
    base = dict(os.environ if env is None else env)
    if base.get(ENV) == "off":
        yield base
        return
    folder = tempfile.mkdtemp(prefix="ddpm-stages-", dir="/tmp")  # short: unix socket paths
    path = os.path.join(folder, "server.sock")
    log = open(os.path.join(folder, "server.log"), "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(  # the modules in its environment: `ps` shows no stage's name
        [sys.executable, "-u", "-m", "pipeline.forkserver", path],
        env={**{k: v for k, v in base.items() if k != ENV}, PRELOAD_ENV: ",".join(preload)},
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield {**base, ENV: path}
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        print(_summary(os.path.join(folder, "server.log")), file=sys.stderr, flush=True)
        for name in ("server.sock", "server.sock.tmp", "server.log"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _summary(log: str) -> str:
    """One line on what the server of a run did, from its log."""
    with contextlib.suppress(OSError):
        lines = Path(log).read_text().splitlines()
        forked = sum(line.startswith("forked ") for line in lines)
        refused = [line for line in lines if line.startswith("refused ")]
        other = [line for line in lines if not line.startswith(("forked ", "refused "))]
        text = f"stage server: {forked} stage(s) forked with the imports done"
        if refused:
            text += f", {len(refused)} ran themselves ({refused[-1]})"
        if other:
            text += f"; its log: {other[-1]}"
        return text
    return "stage server: no log"


if __name__ == "__main__":
    serve(sys.argv[1], [m for m in os.environ.pop(PRELOAD_ENV, "").split(",") if m])
