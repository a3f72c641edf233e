"""The tiny preset through ``stages.repro`` with cluster storage in a bucket (s3:// on a local
moto server, tests/moto_s3.py), then resubmitted in a fresh project copy.

First run: checkpoints (Ray Train writing to S3 itself), the prepared data, the sample and NLL
blocks, the DVC remote and the state land in the bucket. Resubmission (a new copy, nothing
local): the state is restored from the bucket and ``dvc pull``ed, no stage runs again, and the
exported EMA weights are the same bytes.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from repo_copy import BIN, copy_repo, env

sys.path.insert(0, str(Path(__file__).parent))
from moto_s3 import list_keys, make_bucket, moto_server, read_object, s3_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

VARIANT = "eps_fixed_mse"
BUCKET = "ddpm-pipeline"


def repro(repo: Path, endpoint: str, tracking: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    run = subprocess.run(
        [BIN / "python", "-m", "stages.repro", "--local-ray"],
        cwd=repo,
        env=env(
            **s3_env(endpoint),
            DDPM_CLUSTER_STORAGE=f"s3://{BUCKET}/ddpm",
            MLFLOW_TRACKING_URI=tracking,
        ),
        capture_output=True,
        text=True,
    )
    return run, time.perf_counter() - start


def test_tiny_pipeline_with_s3_storage_and_its_resubmission(tmp_path):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with moto_server(tmp_path / "moto.log") as endpoint:
        make_bucket(endpoint, BUCKET)
        first, s1 = repro(copy_repo(tmp_path / "a", variants={VARIANT}), endpoint, tracking)
        assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-6000:]
        keys = list_keys(endpoint, BUCKET, "ddpm/")
        top = {k.split("/")[1] for k in keys}
        assert {"checkpoints", "data", "work", "dvc", "state"} <= top, top
        ckpt = [k for k in keys if k.startswith(f"ddpm/checkpoints/{VARIANT}/")]
        assert any("/checkpoint_000000008/" in k for k in ckpt), ckpt
        assert any("/nodes/rank-0-" in k for k in ckpt) and any("identity.json" in k for k in ckpt)
        assert any(k.startswith("ddpm/data/tiny-") and k.endswith("manifest.json") for k in keys)
        for kind in ("sample", "nll"):
            assert any(k.startswith(f"ddpm/work/{kind}/") and "/block-" in k for k in keys), kind
        assert "ddpm/state/tiny/dvc.lock" in keys
        assert any(k.startswith("ddpm/dvc/files/md5/") for k in keys)
        weights = tmp_path / "a" / "models" / VARIANT / "ema.pt"

        second, s2 = repro(copy_repo(tmp_path / "b", variants={VARIANT}), endpoint, tracking)
        assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-6000:]
        assert "restored the state of an earlier run" in second.stdout
        assert "Running stage" not in second.stdout, second.stdout[-6000:]
        again = tmp_path / "b" / weights.relative_to(tmp_path / "a")
        assert again.read_bytes() == weights.read_bytes()
        print(f"\ns3 storage: first run {s1:.0f} s, resubmission {s2:.0f} s, {len(keys)} objects")


def test_evaluation_during_training_with_s3_storage_selects_a_step(tmp_path):
    """The tiny preset with ``eval_every: 4`` and ``select: best_fid`` on s3:// storage: the
    driver finds the checkpoints Ray Train wrote to the bucket, the scorer tasks get their
    inputs through the object store, and the lowest-FID step is exported; its records are in
    the bucket (a resubmitted driver redoes none)."""
    import json

    import yaml

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    repo = copy_repo(tmp_path / "a", variants={VARIANT})
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["presets"]["tiny"]["train"].update(eval_every=4, eval_samples=4, select="best_fid")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "commit", "-qam", "eval"], cwd=repo, check=True,
                   env=env(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                           GIT_COMMITTER_EMAIL="t@t"))  # fmt: skip
    with moto_server(tmp_path / "moto.log") as endpoint:
        make_bucket(endpoint, BUCKET)
        run, seconds = repro(repo, endpoint, tracking)
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
        selection = json.loads((repo / "models" / VARIANT / "model.json").read_text())["selection"]
        said = [line for line in (run.stdout + run.stderr).splitlines() if "evaluation" in line]
        assert selection["select"] == "best_fid" and selection["evaluations"] == 2, (
            selection,
            said,
        )
        keys = list_keys(endpoint, BUCKET, f"ddpm/checkpoints/{VARIANT}/")
        records = sorted(k.rsplit("/", 1)[1] for k in keys if "/evals/step-" in k)
        assert records == ["step-000000004.json", "step-000000008.json"], keys
        evaluated = [
            json.loads(read_object(endpoint, BUCKET, k)) for k in keys if "/evals/step-" in k
        ]
        best = min(evaluated, key=lambda r: (r["fid"], r["step"]))  # the lowest FID evaluated
        assert (selection["selected_step"], selection["fid"]) == (best["step"], best["fid"])
        assert any(k.endswith("/evals/best/state.pt") for k in keys), keys
        print(f"\ns3 storage with evaluation during training: {seconds:.0f} s")
