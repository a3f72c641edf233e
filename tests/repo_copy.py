"""Test helpers: a fresh copy of this repository to run the pipeline in, and its environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.cluster.raycluster import free_port, free_ports  # noqa: F401  (the tests' import point)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    base.pop("PYTHONPATH", None)  # the copy must run on its own code
    return {**base, "PATH": f"{BIN}:{base['PATH']}", "DVC_NO_ANALYTICS": "1", **extra}


def copy_repo(dest: Path, scale: str = "tiny", variants: set[str] | None = None) -> Path:
    """The repo's tracked files (the working tree's content) in a fresh git repo at ``dest``.

    ``variants`` keeps only those rows of params.yaml's ``variants`` (DVC's matrix shrinks).
    """
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        target = dest / name.decode()
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name.decode()).is_file():
            shutil.copy2(ROOT / name.decode(), target)
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
