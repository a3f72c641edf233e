"""Test helpers: a fresh copy of this repository to run the pipeline in, and its environment.

The tests run on the project as committed, never on the state of the checkout they run in
(issue 42). A test repository is built from HEAD's tree (``git archive``), with one exception
argued below, and never from the index, the working tree's other files or run outputs:

- **Code** (``CODE``: the packages pytest imports in-process, and the pipeline's definition):
  the working tree's content of tracked files, so that the copies run the same code as the
  in-process tests (a developer's uncommitted edit is tested everywhere, or nowhere). Neither
  ``dvc repro`` nor ``dvc exp run`` writes any of these.
- **Everything else** comes from HEAD: ``params.yaml`` (``dvc exp run -S`` and people edit it),
  ``.dvc/``, the docs. ``dvc.lock`` never comes along, not even a committed one: it is a run's
  record (``make repro`` stages it through ``core.autostage``), and a test's run writes its own.
  Untracked and ignored files (data/, models/, mlflow.db, reports/...) never come along.

``PARAMS`` is HEAD's params.yaml, for tests that read the params in-process.
"""

from __future__ import annotations

import atexit
import functools
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import yaml

from pipeline.cluster.raycluster import free_port, free_ports  # noqa: F401  (the tests' import point)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# What a test repo takes from the working tree (tracked files only); the rest is HEAD's.
CODE = ("pipeline", "stages", "tests", "benchmarks", "dvc.yaml", "pyproject.toml", "Makefile")
RUN_RECORDS = ("dvc.lock",)  # never copied, committed or not


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    base.pop("PYTHONPATH", None)  # the copy must run on its own code
    return {**base, "PATH": f"{BIN}:{base['PATH']}", "DVC_NO_ANALYTICS": "1", **extra}


def _git(root: Path, *args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, check=True).stdout


def write_tree(dest: Path, root: Path = ROOT) -> Path:
    """Write the project as committed at ``root`` (rule: the module's docstring) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(_git(root, "archive", "--format=tar", "HEAD"))) as tar:
        tar.extractall(dest, filter="data")
    changed = _git(root, "diff", "--name-status", "--no-renames", "-z", "HEAD", "--", *CODE)
    fields = changed.decode().split("\0")
    for status, name in zip(fields[0::2], fields[1::2], strict=False):
        target = dest / name
        if status == "D" or not (root / name).is_file():
            target.unlink(missing_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, target)
    for name in RUN_RECORDS:
        (dest / name).unlink(missing_ok=True)
    return dest


@functools.cache
def committed() -> Path:
    """One copy of the project as committed, for this test session (removed at exit)."""
    folder = Path(tempfile.mkdtemp(prefix="ddpm-committed-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return write_tree(folder / "repo")


PARAMS = committed() / "params.yaml"


def copy_repo(
    dest: Path, scale: str = "tiny", variants: set[str] | None = None, root: Path = ROOT
) -> Path:
    """The project as committed at ``root`` (see the module's docstring) in a fresh git repo at
    ``dest``, with params.yaml's ``scale`` set to ``scale``.

    ``variants`` keeps only those rows of params.yaml's ``variants`` (DVC's matrix shrinks).
    """
    write_tree(dest, root)
    params = dest / "params.yaml"
    text = params.read_text()
    assert text.count("\nscale: smoke\n") == 1, "params.yaml: expected one `scale: smoke` line"
    params.write_text(text.replace("\nscale: smoke\n", f"\nscale: {scale}\n"))
    if variants is not None:
        data = yaml.safe_load(params.read_text())
        data["variants"] = {k: v for k, v in data["variants"].items() if k in variants}
        params.write_text(yaml.safe_dump(data, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "snapshot"], cwd=dest, check=True)
    return dest
