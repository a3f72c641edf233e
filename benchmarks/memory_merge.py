"""Peak RSS of merging sample shards and hashing/reading them, at N and 4N 256x256 images.

    python -m benchmarks.memory_merge --n 256 --block 64

Each figure runs in a fresh child process (peak RSS is per process): ``old`` is the merge before
issue 16 (``merge_blocks`` concatenates every shard in memory, then a whole-array sha256 copy);
``new`` is ``merge_to_npz`` (one shard at a time, hashed while written), then the evaluate side:
``load_npz_array`` (a memmap) and the Inception cache's ``content_key`` read in chunks. Peak RSS
counts the memmap's resident file pages too (clean page cache the kernel can drop), so the
anonymous and file-backed resident memory at the end are recorded beside it. Writes
``benchmarks/results/memory-merge-<date>.json``. Not the whole reference/sample/evaluate stages
(issue 16 asks for those too; not done).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import results_dir


def child(mode: str, folder: Path, n: int, block: int) -> dict:
    from benchmarks.shards import merge_to_npz
    from pipeline.cluster.blocks import merge_blocks
    from pipeline.evaluation.fidelity import content_key
    from pipeline.sampling.draw import _array_sha256
    from pipeline.sampling.npzmap import load_npz_array

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "old":
        images = merge_blocks(folder, n, block)["images"]
        import hashlib

        hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()  # the old hash
    else:
        merge_to_npz(folder, n, block, folder / "merged.npz")
        images = load_npz_array(folder / "merged.npz", "images")
        _array_sha256(images)
        content_key(images)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    status = Path("/proc/self/status").read_text().splitlines()
    anon = next(int(x.split()[1]) for x in status if x.startswith("RssAnon:"))
    file_backed = next(int(x.split()[1]) for x in status if x.startswith("RssFile:"))
    return {
        "mode": mode,
        "n": n,
        "peak_rss_mb": peak / 1024,  # includes the memmap's resident file pages (reclaimable)
        "after_imports_mb": base / 1024,
        "rss_anon_end_mb": anon / 1024,  # memory the process holds at the end (images alive)
        "rss_file_end_mb": file_backed / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--child", nargs=4)
    args = parser.parse_args()
    if args.child:
        mode, folder, n, block = args.child
        print("RESULT " + json.dumps(child(mode, Path(folder), int(n), int(block))))
        return
    from pipeline.atomic import save_npz
    from pipeline.cluster.blocks import shard_path

    rows = []
    for n in (args.n, 4 * args.n):
        with tempfile.TemporaryDirectory() as tmp:
            rng = np.random.default_rng(0)
            for start in range(0, n, args.block):
                stop = min(start + args.block, n)
                shard = rng.integers(0, 256, (stop - start, 256, 256, 3), dtype=np.uint8)
                save_npz(shard_path(tmp, start, stop), images=shard)
            for mode in ("old", "new"):
                cmd = [sys.executable, "-m", "benchmarks.memory_merge", "--child"]
                done = subprocess.run(
                    [*cmd, mode, tmp, str(n), str(args.block)], capture_output=True, text=True
                )
                line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                row = (
                    json.loads(line[0][7:])
                    if line
                    else {"mode": mode, "n": n, "error": done.stderr[-500:]}
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {
        "benchmark": "memory_merge",
        "image": "256x256x3 uint8 (192 KiB)",
        "block": args.block,
        "load": os.getloadavg(),
        "rows": rows,
    }
    day = datetime.date.today().isoformat()
    path = results_dir() / f"memory-merge-{day}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
