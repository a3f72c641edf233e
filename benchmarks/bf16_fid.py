"""Does bf16 sampling change FID beyond noise? The real pipeline, three experiments of one variant.

    python -m benchmarks.bf16_fid --repo DIR [--variant eps_fixed_mse]

DIR is a clone where ``dvc repro`` has finished (e.g. after ``make repro``). Three ``dvc exp
run`` of ``evaluate@<variant>`` (which reruns only that variant's sampling and evaluation):
float32 with the base seed (the reference), bf16 autocast with the same seed, and float32 with
another seed (the noise level: what FID moves by when only the samples' randomness changes).
bf16 passes when it moves FID by no more than the reseeded run does. The FIDs are those of the
scale's Inception weights (the stand-in at the smoke scale: labelled so). Results:
benchmarks/results/bf16-fid-<device>-<scale>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import results_dir
from benchmarks.run import machine
from pipeline.config import load_config


def experiment(repo: Path, variant: str, scale: str, **sample: object) -> dict:
    """``dvc exp run`` of one variant with sample-section overrides; its metrics JSON."""
    sets = [f"++presets.{scale}.sample.{k}={json.dumps(v)}" for k, v in sample.items()]
    dvc = Path(sys.executable).with_name("dvc")  # this environment's DVC
    cmd = [str(dvc), "exp", "run", f"evaluate@{variant}", *(a for s in sets for a in ("-S", s))]
    print("$ dvc", " ".join(cmd[1:]), flush=True)
    env = {**os.environ, "PATH": f"{dvc.parent}{os.pathsep}{os.environ['PATH']}"}  # its python
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(
            f"error: dvc {' '.join(cmd[1:])} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return json.loads((repo / "metrics" / f"{variant}.json").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="a clone after dvc repro")
    parser.add_argument("--variant", default="eps_fixed_mse")
    args = parser.parse_args(argv)
    cfg = load_config(args.repo / "params.yaml")
    seed = cfg.sample.seed
    device = "cuda" if cfg.sample.use_gpu else "cpu"  # where the sample stage runs
    runs = {
        "fp32": experiment(args.repo, args.variant, cfg.scale, bf16=False, seed=seed),
        "bf16": experiment(args.repo, args.variant, cfg.scale, bf16=True, seed=seed),
        "fp32_reseeded": experiment(args.repo, args.variant, cfg.scale, bf16=False, seed=seed + 1),
    }
    if any("skipped" in m for m in runs.values()):
        sys.exit(f"error: {args.variant} is not run at scale {cfg.scale}; pick another --variant")
    keys = [k for k in ("fid_train", "fid_test") if runs["fp32"].get(k) is not None]
    fid = {name: {k: m[k] for k in keys} for name, m in runs.items()}
    shift = {
        f"{name}_minus_fp32": {k: fid[name][k] - fid["fp32"][k] for k in fid["fp32"]}
        for name in ("bf16", "fp32_reseeded")
    }
    within = all(
        abs(shift["bf16_minus_fp32"][k]) <= abs(shift["fp32_reseeded_minus_fp32"][k])
        for k in fid["fp32"]
    )
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(device),
        "scale": cfg.scale,
        "variant": args.variant,
        "n_samples": runs["fp32"]["n_samples"],
        "stand_in": runs["fp32"]["stand_in"],
        "stand_in_reasons": runs["fp32"].get("stand_in_reasons"),
        "fid": fid,
        "shift": shift,
        "bf16_within_seed_noise": within,
    }
    out = results_dir() / f"bf16-fid-{device}-{cfg.scale}-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
