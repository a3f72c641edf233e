"""Resident memory over one reference Inception pass: glibc's defaults against a fixed threshold.

    python -m benchmarks.heap_creep --n 400                   # pipeline.evaluation.heap.bound_heap
    (default)
    python -m benchmarks.heap_creep --n 400 --default-malloc  # glibc's dynamic mmap threshold

N random 256x256 images in 4 memory-mapped .npy shards (an ImageSet, as the reference stage
reads a prepared split) go through ``compute_reference_stats`` (stand-in Inception on the CPU,
2 threads, batch 16) while a thread samples RssAnon and VmHWM every 0.5 s. A creep of the
anonymous memory over the pass, with nothing kept per image, is the allocator (see
pipeline/evaluation/heap.py); flat from the first batches on is a fixed cost. Prints the timeline as
JSON (``--out`` writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _status(field: str) -> int:
    """A /proc/self/status field in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    return 0


def timeline(n: int, work: Path, default_malloc: bool) -> dict:
    import torch

    import pipeline.evaluation.fidelity
    from pipeline.config import EvalConfig
    from pipeline.data.imageviews import ImagePrefix
    from pipeline.data.loaders import ImageSet
    from pipeline.evaluation.feature_weights import resolve_inception_weights

    if default_malloc:
        pipeline.evaluation.fidelity.bound_heap = lambda: False
    rng, arrays = np.random.default_rng(0), []
    for i in range(4):
        path = work / f"s{i}.npy"
        a = np.lib.format.open_memmap(path, "w+", np.uint8, (n // 4, 256, 256, 3))
        for s in range(0, n // 4, 16):
            a[s : s + 16] = rng.integers(0, 256, a[s : s + 16].shape, dtype=np.uint8)
        a.flush()
        del a
        arrays.append(np.load(path, mmap_mode="r"))
    torch.set_num_threads(2)
    weights = resolve_inception_weights(EvalConfig(inception_weights="stand-in"), work / "fid")
    images = ImagePrefix(ImageSet(work, "train", arrays), n)
    points, stop, start = [], threading.Event(), time.perf_counter()

    def sample() -> None:
        while not stop.is_set():
            t = round(time.perf_counter() - start, 1)
            points.append((t, _status("RssAnon"), _status("VmHWM")))
            time.sleep(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    opts = {"batch_size": 16, "device": "cpu", "threads": 2}
    pipeline.evaluation.fidelity.compute_reference_stats(
        images, "train", weights, work / "fid", work / "ref", **opts
    )
    stop.set()
    thread.join()
    anon = [a for _, a, _ in points]
    tenth = max(1, len(anon) // 10)
    return {
        "n": n,
        "malloc": "glibc defaults" if default_malloc else "pipeline.evaluation.heap.bound_heap",
        "peak_anon_mb": max(anon),
        "peak_anon_first_tenth_mb": max(anon[:tenth]),
        "peak_anon_by_tenth_mb": [max(anon[i : i + tenth]) for i in range(0, len(anon), tenth)],
        "vmhwm_end_mb": points[-1][2],
        "seconds": points[-1][0],
        "timeline_s_anon_hwm": points,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--default-malloc", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    load = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        result = timeline(args.n, Path(tmp), args.default_malloc)
    result["load_start"], result["load_end"] = load, [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
