"""The stage server (pipeline.forkserver): a stage forked from it behaves as its own process.

A fake stage package in a temporary project stands in for stages/: the real server (a
``python -m pipeline.forkserver`` process) and real clients (``python -m fakestages.stage``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline import forkserver

STAGE = """
import json, os, sys, time
from pipeline.cli import entry_point, run_stage

@entry_point
def main(argv=None):
    args = sys.argv[1:]
    print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "args": args,
                      "value": os.environ.get("FAKE_VALUE"), "cwd": os.getcwd(),
                      "server": os.environ.get("DDPM_STAGE_SERVER"),
                      "argv0": os.path.basename(sys.argv[0]),
                      "set_at_import": os.environ.get("TORCH_FAKE_CACHE_DIR")}), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if args[:1] == ["exit"]:
        sys.exit(int(args[1]))
    if args[:1] == ["fail"]:
        raise RuntimeError("a bug in the stage")
    if args[:1] == ["wait"]:
        open("started", "w").write(str(os.getpid()))
        try:
            time.sleep(60)
        finally:
            open("finally-ran", "w").write("yes")

if __name__ == "__main__":
    run_stage(main)
"""


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A project folder with the fake stage package, as the working directory."""
    (tmp_path / "fakestages").mkdir()
    (tmp_path / "fakestages" / "__init__.py").write_text("")
    (tmp_path / "fakestages" / "stage.py").write_text(STAGE)
    # a library that sets an import-time variable when imported (as torchvision sets
    # TORCHINDUCTOR_CACHE_DIR): the server imports it, the client does not
    (tmp_path / "fakestages" / "library.py").write_text(
        "import os\nos.environ.setdefault('TORCH_FAKE_CACHE_DIR', '/tmp/fake')\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(forkserver.ENV, raising=False)
    return tmp_path


@pytest.fixture()
def server(project):
    """A running stage server for the fake stage; yields the stages' environment."""
    with forkserver.stage_server(["fakestages.library", "fakestages.stage"]) as env:
        assert forkserver.wait_ready(env, 60), "the server never listened"
        yield env


def stage(env: dict[str, str], *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fakestages.stage", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def finish(proc: subprocess.Popen) -> tuple[int, dict, str]:
    out, err = proc.communicate(timeout=60)
    return proc.returncode, json.loads(out.splitlines()[0]), err


def test_a_stage_runs_in_a_forked_child_with_the_clients_streams_env_and_args(server, project):
    proc = stage({**server, "FAKE_VALUE": "from the client"}, "a", "b")
    code, seen, err = finish(proc)
    assert code == 0
    assert seen["pid"] != proc.pid  # not the client: a child of the server
    assert seen["ppid"] != proc.pid
    assert seen["args"] == ["a", "b"] and seen["value"] == "from the client"
    assert seen["cwd"] == str(project) and seen["argv0"] == "stage.py"
    assert seen["server"] is None  # the child does not hand itself on
    assert seen["set_at_import"] == "/tmp/fake"  # as if the stage had imported the library
    # a client that imported the library itself has the variable too: still served
    code, seen, _ = finish(p := stage({**server, "TORCH_FAKE_CACHE_DIR": "/tmp/fake"}))
    assert code == 0 and seen["pid"] != p.pid
    assert "to stderr" in err


def test_exit_codes_and_errors_reach_dvc_as_from_the_stage_itself(server):
    code, seen, _ = finish(p := stage(server, "exit", "3"))
    assert code == 3 and seen["pid"] != p.pid
    code, _, err = finish(stage(server, "fail"))
    assert code == 1 and "RuntimeError: a bug in the stage" in err


def test_without_a_server_or_when_refused_the_stage_runs_itself(server, project):
    env = {k: v for k, v in server.items() if k != forkserver.ENV}
    code, seen, _ = finish(p := stage(env))
    assert code == 0 and seen["pid"] == p.pid
    # a variable libraries read at import time differs from the server's: refused, runs here
    code, seen, err = finish(p := stage({**server, "OMP_NUM_THREADS": "7"}))
    assert code == 0 and seen["pid"] == p.pid
    assert "stage server: environment differs in OMP_NUM_THREADS; running here" in err
    code, seen, err = finish(p := stage({**server, "TORCH_FAKE_CACHE_DIR": "/elsewhere"}))
    assert code == 0 and seen["pid"] == p.pid and "differs in TORCH_FAKE_CACHE_DIR" in err
    # a source file the server imported has changed since
    source = project / "fakestages" / "stage.py"
    source.write_text(source.read_text() + "\n")
    os.utime(source, (time.time() + 5, time.time() + 5))
    code, seen, err = finish(p := stage(server))
    assert code == 0 and seen["pid"] == p.pid and "stage.py changed since" in err


def wait_for(path: Path, seconds: float = 30) -> str:
    """The text of ``path`` once it exists (a file the stage writes)."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"no {path}"
        time.sleep(0.05)
    time.sleep(0.1)
    return path.read_text()


def listening(env: dict[str, str], seconds: float = 60) -> Path:
    """The server's socket, once it listens."""
    path = Path(env[forkserver.ENV])
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, "the server never listened"
        time.sleep(0.05)
    return path


def gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_to_the_client_stops_the_stage_as_before(server, project, sig):
    proc = stage(server, "wait")
    child = int(wait_for(project / "started"))
    assert child != proc.pid
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == (130 if sig == signal.SIGINT else 128 + sig)
    assert "interrupted: finished work is kept" in err
    assert (project / "finally-ran").read_text() == "yes"  # the stage's finally blocks ran
    assert gone(child)


def test_a_sigkilled_client_takes_its_stage_with_it(server, project):
    proc = stage(server, "wait")
    child = int(wait_for(project / "started"))
    proc.kill()
    proc.wait(30)
    assert gone(child), "the stage outlived its SIGKILLed client"
    assert not (project / "finally-ran").exists()  # killed, as a SIGKILLed stage is


def test_the_server_is_stopped_with_its_run_and_says_what_it_did(project, capfd):
    with forkserver.stage_server(["fakestages.stage"]) as env:
        path = listening(env)
        assert finish(stage(env))[0] == 0
        assert finish(stage({**env, "OMP_NUM_THREADS": "7"}))[0] == 0
        servers = [
            p.pid
            for p in psutil.process_iter(["cmdline"])
            if str(path) in (p.info["cmdline"] or ())
        ]
        assert len(servers) == 1
    assert gone(servers[0])
    assert not path.parent.exists()
    err = capfd.readouterr().err
    assert "stage server: 1 stage(s) forked with the imports done, 1 ran themselves" in err


def test_off_starts_no_server(project):
    with forkserver.stage_server(["fakestages.stage"], {"DDPM_STAGE_SERVER": "off"}) as env:
        assert env[forkserver.ENV] == "off"
        code, seen, _ = finish(p := stage({**os.environ, **env}))
        assert code == 0 and seen["pid"] == p.pid
