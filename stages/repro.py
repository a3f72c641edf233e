"""Run the whole pipeline where there is no git checkout, e.g. as a Ray job.

``ray job submit --working-dir . -- python -m stages.repro [--scale NAME] [DVC REPRO ARGS]``

Ray uploads the working directory without ``.git``, and ``dvc repro`` refuses to run outside a
git repository unless DVC is told not to use one (``core.no_scm``, set here in the local DVC
config, which is never committed); ``git`` itself is not needed. ``--scale`` rewrites params.yaml's
``scale:`` line (comments kept) before running.

As a Ray job, MLflow must not write into the job's temporary working directory: with no
MLFLOW_TRACKING_URI (and no params ``mlflow.tracking_uri``), or one inside it, the job stops
before any work with one ``error:`` line. With ``cluster.storage`` set (:mod:`pipeline.durable`),
the run first restores what earlier jobs stored (dvc.lock, the uncached outputs, ``dvc pull`` from
the storage remote), then reproduces stage by stage, pushing each finished stage at once: a
stopped job keeps what it finished and a resubmitted one continues. Without storage, results
stay in the job's working directory; ``--push`` pushes to a configured DVC remote at the end.

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
from pipeline.durable import check_job_tracking, reproduce_with_storage
from pipeline.errors import UserError
from pipeline.raycluster import local_head, ray_address
from pipeline.storage import check_storage


def in_git_repo() -> bool:
    """Whether the working directory is in a git repository (False where git is not installed)."""
    try:
        done = subprocess.run(["git", "rev-parse", "--git-dir"], capture_output=True, check=False)
    except OSError:
        return False
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
    parser.add_argument(
        "--push",
        action="store_true",
        help="dvc push the outputs afterwards (with cluster storage: after every stage anyway)",
    )
    parser.add_argument(
        "--local-ray",
        action="store_true",
        help="run every stage on one private local Ray head (unless a cluster is configured)",
    )
    args, repro_args = parser.parse_known_args(argv)
    if args.scale:
        set_scale(Path("params.yaml"), args.scale)
    cfg = load_config(Path("params.yaml"))
    check_job_tracking(cfg, Path.cwd())  # before any work: one error line
    storage = check_storage(cfg)
    if not in_git_repo():
        dvc("config", "--local", "core.no_scm", "true")
    if args.local_ray and not ray_address(cfg.ray):
        print("starting a local Ray cluster for this run", flush=True)
        with local_head(cfg.ray.num_cpus) as head:
            env = {**os.environ, "RAY_ADDRESS": head.address}
            reproduce(storage, cfg.scale, repro_args, env)
    else:
        reproduce(storage, cfg.scale, repro_args, None)
    if args.push and storage is None:
        dvc("push")


def reproduce(
    storage: Path | None, scale: str, repro_args: list[str], env: dict[str, str] | None
) -> None:
    """``dvc repro``, or with cluster storage: restore, then stage by stage with a push each."""
    if storage is None:
        dvc("repro", *repro_args, env=env)
    else:
        reproduce_with_storage(storage, scale, repro_args, lambda *a: dvc(*a, env=env))


if __name__ == "__main__":
    main(sys.argv[1:])
