"""Run the whole pipeline where there is no git checkout, e.g. as a Ray job.

``ray job submit --working-dir . -- python -m stages.repro [--scale NAME] [DVC REPRO ARGS]``

Ray uploads the working directory without ``.git``, and ``dvc repro`` refuses to run outside a
git repository unless DVC is told not to use one (``core.no_scm``, set here in the local DVC
config, which is never committed). ``--scale`` rewrites params.yaml's ``scale:`` line (comments
kept) before running. Results are in MLflow (set MLFLOW_TRACKING_URI in the job's runtime_env)
and in the job's working directory; configure a DVC remote to keep the outputs (``--push``).

``--local-ray`` (what ``make repro`` uses) starts one private Ray head for the whole run and
points every stage at it (RAY_ADDRESS), instead of each Ray stage starting its own local cluster:
~10 s less per Ray stage. It is stopped when the run ends. A cluster named by RAY_ADDRESS or
params' ``ray.address`` wins.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from pipeline.cli import entry_point
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.raycluster import local_head, ray_address


def in_git_repo() -> bool:
    done = subprocess.run(["git", "rev-parse", "--git-dir"], capture_output=True, check=False)
    return done.returncode == 0


def set_scale(params: Path, scale: str) -> None:
    """Point params.yaml's top-level ``scale:`` at ``scale`` (checked against the presets)."""
    text = params.read_text()
    new, count = re.subn(r"(?m)^scale:[^\n#]*", f"scale: {scale}", text, count=1)
    if count != 1:
        raise UserError(f"{params}: no top-level `scale:` line to set")
    params.write_text(new)
    load_config(params)  # fails with a clear error for an unknown preset


def dvc(*args: str, env: dict[str, str] | None = None) -> None:
    """Run ``dvc ARGS``; on Ctrl-C wait for it to stop (it got the SIGINT too), then re-raise."""
    proc = subprocess.Popen(["dvc", *args], env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.wait()
        raise
    if code:
        raise SystemExit(code)


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", help="switch params.yaml to this preset first")
    parser.add_argument("--push", action="store_true", help="dvc push the outputs afterwards")
    parser.add_argument(
        "--local-ray",
        action="store_true",
        help="run every stage on one private local Ray head (unless a cluster is configured)",
    )
    args, repro_args = parser.parse_known_args(argv)
    if args.scale:
        set_scale(Path("params.yaml"), args.scale)
    if not in_git_repo():
        dvc("config", "--local", "core.no_scm", "true")
    cfg = load_config(Path("params.yaml"))
    if args.local_ray and not ray_address(cfg.ray):
        print("starting a local Ray cluster for this run", flush=True)
        with local_head(cfg.ray.num_cpus) as head:
            dvc("repro", *repro_args, env={**os.environ, "RAY_ADDRESS": head.address})
    else:
        dvc("repro", *repro_args)
    if args.push:
        dvc("push")


if __name__ == "__main__":
    main(sys.argv[1:])
