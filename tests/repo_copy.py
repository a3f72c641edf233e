"""Test helpers: a fresh copy of this repository to run the pipeline in, and its environment."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    base.pop("PYTHONPATH", None)  # the copy must run on its own code
    return {**base, "PATH": f"{BIN}:{base['PATH']}", "DVC_NO_ANALYTICS": "1", **extra}


def copy_repo(dest: Path, scale: str = "tiny") -> Path:
    """The repo's tracked files (the working tree's content) in a fresh git repo at ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        target = dest / name.decode()
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name.decode()).is_file():
            shutil.copy2(ROOT / name.decode(), target)
    params = dest / "params.yaml"
    params.write_text(params.read_text().replace("\nscale: smoke\n", f"\nscale: {scale}\n"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "snapshot"], cwd=dest, check=True)
    return dest
