"""One task per GPU, on a local Ray node that declares two fake GPUs (no GPU needed).

The child process owns its Ray instance (the session's shared one declares no GPUs). Each block
task records the ``CUDA_VISIBLE_DEVICES`` Ray gave it, its pid, its time span, and the devices
its worker process saw first (as a CUDA context created by an earlier task would keep them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    import ray
    from pipeline.cluster.blocks import merge_blocks, run_blocks

    def record(start, stop, shared):
        seen = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        first = os.environ.setdefault("DDPM_TEST_FIRST_DEVICES", seen)  # lives with the process
        begin = time.time()
        time.sleep(shared)
        n = stop - start
        return {
            "pid": np.full(n, os.getpid()),
            "begin": np.full(n, begin),
            "end": np.full(n, time.time()),
            "seen": np.array([seen] * n),
            "first": np.array([first] * n),
        }

    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False,
             log_to_driver=False)
    out = sys.argv[1]
    run_blocks(record, 3, 1, out, num_workers=4, resources={"num_cpus": 1, "num_gpus": 1},
               shared=0.5, desc="blocks")
    merged = merge_blocks(out, 3, 1)
    print(json.dumps({k: v.tolist() for k, v in merged.items()}))
    ray.shutdown()
    """
)


def test_concurrent_gpu_blocks_get_distinct_devices_and_fresh_workers(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "blocks")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rec = json.loads(done.stdout.strip().splitlines()[-1])
    n = len(rec["pid"])
    assert n == 3
    # every task got one of the two fake GPUs, and both were used
    assert all(seen in ("0", "1") for seen in rec["seen"]), rec["seen"]
    assert set(rec["seen"]) == {"0", "1"}
    # a worker never keeps a stale device: each GPU task ran in a fresh process
    assert len(set(rec["pid"])) == n, rec["pid"]
    assert rec["first"] == rec["seen"]
    # tasks running at the same time never share a device
    for i in range(n):
        for j in range(i + 1, n):
            overlap = rec["begin"][i] < rec["end"][j] and rec["begin"][j] < rec["end"][i]
            if overlap:
                assert rec["seen"][i] != rec["seen"][j], (i, j, rec)
