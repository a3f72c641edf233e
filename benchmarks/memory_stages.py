"""Peak memory of the prepare, reference, sample and evaluate code paths at N and 4N 256x256 images.

    python -m benchmarks.memory_stages --n 100

For N and 4N: an LSUN-format LMDB of that many records (``benchmarks.prepare_data``'s photo-like
JPEG/WebP mix) is prepared by ``dvc repro prepare`` in a temporary DVC project with this
project's prepare stage (``data/${scale}`` uncached), then each code path runs in a fresh child
process (peak memory is per process):

- ``prepare``: the ``dvc repro prepare`` run (peak RSS of the largest process, dvc or the stage);
  then the disk used by ``data/<scale>/`` and by ``.dvc/cache`` (disk once: ~1x the data).
- ``reference``: what ``stages/reference.py`` does: ``open_split`` of the train split,
  :class:`ImagePrefix` over all of it, ``compute_reference_stats`` (Inception pass with the
  stand-in weights, statistics, IS) on the CPU.
- ``sample``: the sample stage's output path with synthetic blocks (random uint8 shards of 64
  images as the block tasks leave them; no network, a 256x256 model is too slow for this CPU):
  ``map_blocks`` (memory-mapped blocks), the 8x8 grid, ``publish_shards`` (hard links into the
  samples folder, every shard hashed) and the manifest. Also the disk used by the blocks and the
  samples folder together (hard links counted once: ~1x the samples).
- ``evaluate``: the evaluate stage's FID/IS path: ``open_samples`` of the samples folder (every
  shard's sha256 verified, then memory-mapped), ``compute_fid_is`` against the reference
  statistics above (Inception pass, FID, IS). The NLL and figures part of evaluate works on a
  bounded number of test images (eval keys), not N.

Each child records VmHWM (peak resident set, including file pages of memory maps, which the
kernel can drop) and the peak anonymous resident memory (RssAnon, sampled every 20 ms): a whole
split or sample set materialised in memory shows in the latter. Writes
``benchmarks/results/memory-stages-<date>[-<tag>].json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks import results_dir

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 64  # images per synthetic sample shard
LOAD_START = [round(x, 2) for x in os.getloadavg()]


def _status(field: str) -> int:
    """A /proc/self/status field in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class AnonPeak:
    """The peak RssAnon of this process, sampled by a thread every ``every`` seconds."""

    def __init__(self, every: float = 0.02) -> None:
        self.peak, self.every, self.stop = _status("RssAnon"), every, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, _status("RssAnon"))
            time.sleep(self.every)

    def __enter__(self) -> AnonPeak:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, _status("RssAnon"))


def child(mode: str, work: Path) -> dict:
    """Run one code path on the prepared folders under ``work``; its memory figures."""
    import torch

    from pipeline.config import EvalConfig
    from pipeline.data import open_split
    from pipeline.data.imageviews import ImagePrefix
    from pipeline.evaluation.feature_weights import resolve_inception_weights
    from pipeline.evaluation.fidelity import compute_fid_is, compute_reference_stats
    from pipeline.sampling.figures import save_sample_grid
    from pipeline.sampling.shards import map_blocks, open_samples, publish_shards

    if os.environ.get("BENCH_DEFAULT_MALLOC"):  # --default-malloc: glibc's dynamic thresholds
        import pipeline.evaluation.fidelity

        pipeline.evaluation.fidelity.bound_heap = lambda: False
    torch.set_num_threads(2)
    cache = work / "fidelity"
    weights = resolve_inception_weights(EvalConfig(inception_weights="stand-in"), cache)
    opts = {"batch_size": int(os.environ.get("BENCH_INCEPTION_BATCH", "16")), "device": "cpu"}
    opts["threads"] = 2
    base_hwm, base_anon = _status("VmHWM"), _status("RssAnon")
    start = time.perf_counter()
    with AnonPeak() as anon:
        if mode == "reference":
            full = open_split(work / "repo" / "data" / "bench", "train")
            images = ImagePrefix(full, len(full))
            (work / "reference").mkdir(exist_ok=True)
            compute_reference_stats(images, "train", weights, cache, work / "reference", **opts)
            count = len(images)
        elif mode == "sample":
            n = int((work / "n").read_text())
            images = map_blocks(work / "blocks", n, BLOCK)
            (work / "samples").mkdir(exist_ok=True)
            save_sample_grid(work / "samples" / "grid.png", images[:64], "benchmark")
            manifest = publish_shards(work / "blocks", n, BLOCK, work / "samples")
            (work / "samples" / "manifest.json").write_text(json.dumps(manifest))
            count = len(images)
        elif mode == "evaluate":
            manifest = json.loads((work / "samples" / "manifest.json").read_text())
            samples = open_samples(work / "samples", manifest, "rerun")  # hashes verified
            reference = {"train": work / "reference" / "train-stats.pt"}
            images = ImagePrefix(samples, len(samples))  # as pipeline.evaluation.evaluate does
            compute_fid_is(images, reference, weights, work / "fid", **opts)
            count = len(samples)
        else:
            raise ValueError(mode)
    extra = {}
    if mode == "sample":
        shards = du_mb(work / "blocks", work / "samples", pattern="*.npz")  # links once
        extra["disk_mb"] = {
            "blocks": du_mb(work / "blocks"),
            "blocks_and_sample_shards": shards,
            "samples_folder": du_mb(work / "samples"),  # its shards, and a grid of random pixels
        }
    return {
        "stage": mode,
        "n": count,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(_status("VmHWM") / 1024, 1),  # includes memory-mapped file pages
        "peak_anon_mb": round(anon.peak / 1024, 1),
        "before_mb": {"rss": round(base_hwm / 1024, 1), "anon": round(base_anon / 1024, 1)},
        "anon_growth_mb": round((anon.peak - base_anon) / 1024, 1),  # above imports and weights
        "rss_file_end_mb": round(_status("RssFile") / 1024, 1),
        **extra,
    }


def run_child(mode: str, work: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.memory_stages", "--child", mode, str(work)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(ROOT))
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[0][7:]) if line else {"stage": mode, "error": done.stderr[-800:]}


def _env(pythonpath: Path) -> dict[str, str]:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PYTHONPATH": str(pythonpath), "PATH": path, "DVC_NO_ANALYTICS": "1"}


def du_mb(*paths: Path, pattern: str = "*") -> float:
    """Disk used by the files under ``paths`` (allocated blocks; hard links counted once)."""
    seen, total = set(), 0
    for path in paths:
        for p in path.rglob(pattern) if path.exists() else []:
            st = p.lstat()
            if p.is_file() and not p.is_symlink() and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return round(total / 2**20, 1)


def prepare_repo(work: Path, n: int) -> dict:
    """``dvc repro prepare`` of an n-record LSUN LMDB in a fresh DVC project; memory and disk."""
    from benchmarks.prepare_data import make_lsun_lmdb

    make_lsun_lmdb(work / "lmdb", n)
    repo = work / "repo"
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("pipeline", "stages"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=ignore)
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
    data = {"dataset": "lsun_bedroom", "resolution": 256, "source": str(work / "lmdb")}
    data.update(shard_size=max(n // 4, 1), workers=2)
    eval_ = {"nll_images": 0, "fid_against": ["train"]}  # LSUN: no test split
    params = {"scale": "bench", "presets": {"bench": {"data": data, "eval": eval_}}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    keep = {name: stages[name] for name in ("config", "prepare")}  # config: prepare's params
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": keep}, sort_keys=False))
    env = _env(repo)
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=repo, env=env, check=True)
    cmd = [sys.executable, "-c", PREPARE_WRAPPER]
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stdout[-800:] + done.stderr[-800:])
    peak = json.loads(done.stdout.splitlines()[-1])
    return {
        "stage": "prepare",
        "n": n,
        "seconds": peak["seconds"],
        "peak_rss_mb": peak["peak_rss_mb"],
        "disk_mb": {
            "lmdb_source": du_mb(work / "lmdb"),
            "data": du_mb(repo / "data" / "bench"),
            "dvc_cache": du_mb(repo / ".dvc" / "cache"),
        },
    }


# ``dvc repro prepare`` in a child whose RUSAGE_CHILDREN ru_maxrss is its largest descendant.
PREPARE_WRAPPER = """
import json, resource, subprocess, time
start = time.perf_counter()
subprocess.run(["dvc", "repro", "-q", "prepare"], check=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"peak_rss_mb": round(peak / 1024, 1),
                  "seconds": round(time.perf_counter() - start, 1)}))
"""


def synthetic_blocks(folder: Path, n: int) -> None:
    """Random uint8 shards of BLOCK images, as the sample block tasks leave them."""
    from pipeline.atomic import save_npz
    from pipeline.cluster.blocks import shard_path

    rng = np.random.default_rng(0)
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        shard = rng.integers(0, 256, (stop - start, 256, 256, 3), dtype=np.uint8)
        save_npz(shard_path(folder, start, stop), images=shard)


def flatness(rows: list[dict], n: int) -> dict:
    """Per stage: 4N's peak over N's (VmHWM and anonymous), 1.0 being perfectly flat."""
    out = {}
    for stage in ("prepare", "reference", "sample", "evaluate"):
        small = next((r for r in rows if r["stage"] == stage and r.get("n") == n), None)
        large = next((r for r in rows if r["stage"] == stage and r.get("n") == 4 * n), None)
        if small and large and "peak_rss_mb" in small and "peak_rss_mb" in large:
            ratio = {"rss": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3)}
            if "peak_anon_mb" in small:
                ratio["anon"] = round(large["peak_anon_mb"] / small["peak_anon_mb"], 3)
                growth = large["anon_growth_mb"] - small["anon_growth_mb"]
                ratio["anon_growth_4n_minus_n_mb"] = round(growth, 1)
            out[stage] = ratio
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="N (and 4N) records / samples")
    parser.add_argument("--batch", type=int, default=16, help="Inception batch (below N)")
    parser.add_argument("--tag", default="", help="suffix of the result file's name")
    parser.add_argument(
        "--default-malloc", action="store_true", help="without pipeline.evaluation.heap.bound_heap"
    )
    parser.add_argument("--child", nargs=2, metavar=("STAGE", "WORK"))
    args = parser.parse_args()
    if args.child:
        mode, work = args.child  # the batch comes in BENCH_INCEPTION_BATCH
        print("RESULT " + json.dumps(child(mode, Path(work))), flush=True)
        return
    os.environ["BENCH_INCEPTION_BATCH"] = str(args.batch)
    if args.default_malloc:
        os.environ["BENCH_DEFAULT_MALLOC"] = "1"
    rows = []
    for n in (args.n, 4 * args.n):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            (work / "n").write_text(str(n))
            rows.append(prepare_repo(work, n))
            print(json.dumps(rows[-1]), flush=True)
            synthetic_blocks(work / "blocks", n)
            for mode in ("reference", "sample", "evaluate"):
                rows.append(run_child(mode, work))
                print(json.dumps(rows[-1]), flush=True)
    result = {
        "benchmark": "memory_stages",
        "image": "256x256x3 uint8 (192 KiB)",
        "machine": f"{os.cpu_count()} CPUs, {os.uname().machine}, {os.uname().sysname}",
        "inception": f"stand-in weights, CPU, 2 threads, batch {args.batch}",
        "malloc": "glibc defaults"
        if args.default_malloc
        else "pipeline.evaluation.heap.bound_heap",
        "load_start": LOAD_START,
        "load_end": [round(x, 2) for x in os.getloadavg()],
        "flatness_4n_over_n": flatness(rows, args.n),
        "rows": rows,
    }
    print(json.dumps(result["flatness_4n_over_n"]))
    day = datetime.date.today().isoformat()
    result["command"] = " ".join(["python -m benchmarks.memory_stages", *sys.argv[1:]])
    name = f"memory-stages-{day}" + (f"-{args.tag}" if args.tag else "")
    path = results_dir() / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
