"""Per variant: the pipeline's stages against the bare loop, alternating (issue 27's method).

    python -m benchmarks.side_by_side                  # in a project after make repro
    python -m benchmarks.side_by_side --rounds 2 --variant eps_fixed_mse

Each round runs, one after the other, "ours":
``python -m stages.repro --local-ray -f -s train@V sample@V evaluate@V`` (the three stages of one
variant forced, the reference statistics and the feature network kept; the variant's training
run and its sample, bound and FID caches under work/ removed first, so that every stage does its
whole work), and "bare":
``python -m benchmarks.bare_loop`` (diffusers + torch-fidelity in one process, the preset's
settings). Ours' stage times are the wall-clock time from each ``Running stage`` line of
``dvc repro`` to the next (the last to the end of ``dvc repro``), so they include DVC's own work
between stages; the evaluate stage is split into FID/IS and the rest (the bound and Fig. 7/8,
``nll_and_figures`` in its summary line), which bare does not do. The local Ray head
that ``--local-ray`` starts once for a whole ``make repro`` is reported apart. Bare's parts are
its own ``seconds`` (imports excluded, as in the issue's table).

Prints one JSON line (and writes it under benchmarks/results/, or $DDPM_BENCH_RESULTS):
per round both sides' parts, the CPU time the hypervisor took from each (steal), what the stage
server did, the per-variant ratio ``(train + sample + evaluate - bound and
figures) / (bare train + sample + fid_is)``, the in-stage steps/s from the train stage's log and
bare's, and the load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

STAGE = re.compile(r"^Running stage '([^@']+)@")
STEPS = re.compile(r"step \d+/\d+ loss \S+ ([\d.]+) steps/s")
BOUND = re.compile(r"seconds: .*nll_and_figures ([\d.]+)")  # the evaluate stage's summary line
SERVER = re.compile(r"^stage server: .*")  # what the stage server did (pipeline.forkserver)


def steal_s() -> float | None:
    """CPU time the hypervisor gave to others since boot (/proc/stat's steal), in seconds: a
    side whose steal grew had less of this VM's CPU than the other."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def stolen(before: float | None) -> float | None:
    after = steal_s()
    return None if before is None or after is None else round(after - before, 2)


def clear_variant(variant: str, root: Path) -> None:
    """Remove what lets a forced stage skip its work: the variant's training run (a forced train
    stage would resume at its last step) and its sample, bound and FID caches under work/."""
    for folder in (root / "checkpoints" / variant, *root.glob(f"work/*/{variant}")):
        shutil.rmtree(folder, ignore_errors=True)


def run_ours(variant: str, root: Path) -> dict:
    """Wall seconds of each stage of one forced variant, and the train stage's steps/s."""
    clear_variant(variant, root)
    stages = [f"{s}@{variant}" for s in ("train", "sample", "evaluate")]
    command = [sys.executable, "-m", "stages.repro", "--local-ray", "-f", "-s", *stages]
    start = time.perf_counter()
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(
        command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        for line in process.stdout:
            lines.append((time.perf_counter(), line))
    if process.returncode != 0:
        tail = "".join(line for _, line in lines[-20:])
        raise SystemExit(f"stages.repro failed with status {process.returncode}:\n{tail}")
    return parse_repro(lines, start, time.perf_counter())


def parse_repro(lines: list[tuple[float, str]], start: float, end: float) -> dict:
    """Stage seconds, the evaluate stage's split and the in-stage steps/s from the timestamped
    output lines of ``stages.repro`` (``(perf_counter, line)``) that ran from start to end."""
    marks, rates, bound, server = [], [], 0.0, None
    for now, line in lines:
        if m := SERVER.match(line):
            server = m.group(0).strip()
        elif m := STAGE.match(line):
            marks.append((m.group(1), now))
        elif m := STEPS.search(line):
            rates.append(float(m.group(1)))
        elif m := BOUND.search(line):
            bound = float(m.group(1))
    seconds = {"ray_head": marks[0][1] - start if marks else 0.0}
    for (name, at), (_, until) in zip(marks, [*marks[1:], ("end", end)], strict=True):
        seconds[name] = until - at
    seconds["evaluate_bound_and_figures"] = bound
    seconds["evaluate_fid_is_part"] = seconds["evaluate"] - bound
    steady = rates[1:] or rates  # the first interval includes the start-up
    return {
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "train_steps_per_s": round(sum(steady) / len(steady), 2) if steady else None,
        "train_intervals_steps_per_s": rates,
        "stage_server": server,
        "variant_s": round(
            seconds["train"] + seconds["sample"] + seconds["evaluate_fid_is_part"], 2
        ),
    }


def run_bare(root: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bare_loop", "--root", str(root)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    s = result["seconds"]
    return {
        "seconds": s,
        "train_steps_per_s": result["train_steps_per_s"],
        "variant_s": round(s["train"] + s["sample"] + s["fid_is"], 2),
        "metrics": result.get("metrics"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", type=Path, default=Path("."), help="the project (after make repro)"
    )
    parser.add_argument("--variant", default="eps_fixed_mse")
    parser.add_argument("--rounds", type=int, default=2, help="ours then bare, this many times")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if not (root / "metrics" / f"{args.variant}.json").is_file():
        raise SystemExit(f"error: run `make repro` in {root} first (no metrics of {args.variant})")
    rounds = []
    load_start = os.getloadavg()
    for _ in range(args.rounds):
        before = steal_s()
        ours = run_ours(args.variant, root)
        ours["steal_s"], before = stolen(before), steal_s()
        bare = run_bare(root)
        bare["steal_s"] = stolen(before)
        rounds.append(
            {"ours": ours, "bare": bare, "ratio": round(ours["variant_s"] / bare["variant_s"], 3)}
        )
        print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
    result = {
        "benchmark": "side_by_side",
        "date": datetime.date.today().isoformat(),
        "variant": args.variant,
        "rounds": rounds,
        "ratios": [r["ratio"] for r in rounds],
        "load_start": [round(v, 2) for v in load_start],
        "load_end": [round(v, 2) for v in os.getloadavg()],
    }
    line = json.dumps(result)
    print(line)
    folder = Path(os.environ.get("DDPM_BENCH_RESULTS", Path(__file__).parent / "results"))
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    (folder / f"side-by-side-{stamp}.json").write_text(line + "\n")


if __name__ == "__main__":
    main()
