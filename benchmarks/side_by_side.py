"""Per variant: the pipeline's stages against the bare loop (issue 27's method).

    python -m benchmarks.side_by_side                  # in a project after make repro
    python -m benchmarks.side_by_side --rounds 2 --variant eps_fixed_mse
    python -m benchmarks.side_by_side --rounds 3 --interleave 2   # both at once, taking turns

Each round runs "ours":
``python -m stages.repro --local-ray -f -s train@V sample@V evaluate@V`` (the three stages of one
variant forced, the reference statistics and the feature network kept; the variant's training
run and its sample, bound and FID caches under work/ removed first, so that every stage does its
whole work), and "bare":
``python -m benchmarks.bare_loop --marks`` (diffusers + torch-fidelity in one process, the
preset's settings). By default one after the other; with ``--interleave SECONDS`` both at once,
each frozen while the other has its turn of SECONDS (benchmarks/timeslice.py), so that both
meet the same drift of the VM and every time below is a side's own active time.

Ours' stage times run from each ``Running stage`` line of ``dvc repro`` to the next (the last to
the end of ``dvc repro``), so they include DVC's own work between stages; the evaluate stage is
split into FID/IS and the rest (the bound and Fig. 7/8, ``nll_and_figures`` in its summary
line), which bare does not do. The local Ray head that ``--local-ray`` starts once for a whole
``make repro`` is reported apart. Bare's parts run from one of its marks to the next (imports
excluded, as in the issue's table). Steps/s on both sides: from the first step line (step 100)
to the last (step 1000), the loop's start-up left out on both.

Prints one JSON line (and writes it under benchmarks/results/, or $DDPM_BENCH_RESULTS):
per round both sides' parts, the CPU time the hypervisor took (steal), what the stage
server did, the per-variant ratio ``(train + sample + evaluate - bound and
figures) / (bare train + sample + fid_is)``, the step ratio (ours' steps/s over bare's), and
the load average.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

STAGE = re.compile(r"^Running stage '([^@']+)@")
STEPS = re.compile(r"step (\d+)/\d+ loss \S+ ([\d.]+) steps/s")
BARE_STEP = re.compile(r"^bare: step (\d+)/\d+")  # benchmarks.bare_loop --marks
BARE_MARK = re.compile(r"^bare: (\w+)$")
PROJECT = Path(__file__).resolve().parents[1]
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


def ours_command(variant: str) -> list[str]:
    stages = [f"{s}@{variant}" for s in ("train", "sample", "evaluate")]
    return [sys.executable, "-m", "stages.repro", "--local-ray", "-f", "-s", *stages]


def bare_command(root: Path) -> list[str]:
    return [sys.executable, "-m", "benchmarks.bare_loop", "--root", str(root), "--marks"]


def run_ours(variant: str, root: Path) -> dict:
    """Wall seconds of each stage of one forced variant, and the train stage's steps/s."""
    clear_variant(variant, root)
    start = time.perf_counter()
    lines = _timestamped(ours_command(variant), root, "stages.repro")
    return parse_repro(lines, start, time.perf_counter())


def run_bare(root: Path) -> dict:
    lines = _timestamped(bare_command(root), PROJECT, "benchmarks.bare_loop")
    return parse_bare(lines)


def _timestamped(command: list[str], cwd: Path, what: str) -> list[tuple[float, str]]:
    """Run ``command``; its output lines with the perf_counter time each arrived."""
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        for line in process.stdout:
            lines.append((time.perf_counter(), line))
    _check(process.returncode, lines, what)
    return lines


def _check(code: int, lines: list[tuple[float, str]], what: str) -> None:
    if code != 0:
        tail = "".join(line for _, line in lines[-20:])
        raise SystemExit(f"{what} failed with status {code}:\n{tail}")


def run_interleaved(variant: str, root: Path, slice_s: float) -> tuple[dict, dict]:
    """Ours and bare at once, taking turns of ``slice_s`` seconds (benchmarks.timeslice): each
    side's seconds are its active seconds, so both met the same drift of the VM."""
    from benchmarks.timeslice import Side, take_turns

    clear_variant(variant, root)
    ours = Side("ours", ours_command(variant), root)
    bare = Side("bare", bare_command(root), PROJECT)
    start = time.perf_counter()
    try:
        take_turns([ours, bare], slice_s)
    finally:
        codes = [side.finish() for side in (ours, bare)]
    _check(codes[0], ours.lines, "stages.repro")
    _check(codes[1], bare.lines, "benchmarks.bare_loop")
    mine = parse_repro(ours.lines, start, ours.turns[-1][1], span=ours.span)
    theirs = parse_bare(bare.lines, span=bare.span)
    for side, result in ((ours, mine), (bare, theirs)):
        result["turns"] = len(side.turns)
        result["active_s"] = round(sum(b - a for a, b in side.turns), 2)
    return mine, theirs


Span = Callable[[float, float], float]


def wall(start: float, end: float) -> float:
    return end - start


def window_rate(points: list[tuple[float, int]], span: Span) -> float | None:
    """Steps/s from the first step line to the last (``(time, step)``): the first interval,
    with the loop's start-up, is left out on both sides."""
    if len(points) < 2:
        return None
    (t0, s0), (t1, s1) = points[0], points[-1]
    seconds = span(t0, t1)
    return round((s1 - s0) / seconds, 2) if seconds > 0 else None


def parse_repro(
    lines: list[tuple[float, str]], start: float, end: float, span: Span = wall
) -> dict:
    """Stage seconds, the evaluate stage's split and the in-stage steps/s from the timestamped
    output lines of ``stages.repro`` (``(perf_counter, line)``) that ran from start to end;
    ``span(a, b)``: the seconds it ran between two times (interleaved: its turns only)."""
    marks, rates, points, bound, server = [], [], [], 0.0, None
    for now, line in lines:
        if m := SERVER.match(line):
            server = m.group(0).strip()
        elif m := STAGE.match(line):
            marks.append((m.group(1), now))
        elif m := STEPS.search(line):
            points.append((now, int(m.group(1))))
            rates.append(float(m.group(2)))
        elif m := BOUND.search(line):
            bound = float(m.group(1))
    seconds = {"ray_head": span(start, marks[0][1]) if marks else 0.0}
    for (name, at), (_, until) in zip(marks, [*marks[1:], ("end", end)], strict=True):
        seconds[name] = span(at, until)
    seconds["evaluate_bound_and_figures"] = bound
    seconds["evaluate_fid_is_part"] = seconds["evaluate"] - bound
    return {
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "train_steps_per_s": window_rate(points, span),
        "train_intervals_steps_per_s": rates,  # the stage's own (wall-clock) figures
        "stage_server": server,
        "variant_s": round(
            seconds["train"] + seconds["sample"] + seconds["evaluate_fid_is_part"], 2
        ),
    }


def parse_bare(lines: list[tuple[float, str]], span: Span = wall) -> dict:
    """Seconds of bare's parts and its steps/s from its ``--marks`` lines (timed as ours'),
    its metrics from its JSON line."""
    marks, points = {}, []
    for now, line in lines:
        if m := BARE_STEP.match(line):
            points.append((now, int(m.group(1))))
        elif m := BARE_MARK.match(line):
            marks[m.group(1)] = now
    result = json.loads(next(line for _, line in reversed(lines) if line.startswith("{")))
    parts = ["train", "sample", "fid_is", "end"]
    seconds = {p: round(span(marks[p], marks[q]), 2) for p, q in itertools.pairwise(parts)}
    return {
        "seconds": {
            "imports_and_data": sum(result["seconds"][k] for k in ("imports", "data")),
            **seconds,
        },
        "train_steps_per_s": window_rate(points, span),
        "variant_s": round(sum(seconds.values()), 2),
        "metrics": result.get("metrics"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", type=Path, default=Path("."), help="the project (after make repro)"
    )
    parser.add_argument("--variant", default="eps_fixed_mse")
    parser.add_argument("--rounds", type=int, default=2, help="ours then bare, this many times")
    parser.add_argument(
        "--interleave",
        type=float,
        metavar="SECONDS",
        help="run both sides at once, taking turns of SECONDS on the machine (cgroup freezer, "
        "root): both meet the same drift of the VM (benchmarks/timeslice.py)",
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if not (root / "metrics" / f"{args.variant}.json").is_file():
        raise SystemExit(f"error: run `make repro` in {root} first (no metrics of {args.variant})")
    rounds = []
    load_start = os.getloadavg()
    if args.interleave is not None:
        from benchmarks.timeslice import freezer_root

        try:
            freezer_root()
        except RuntimeError as e:
            raise SystemExit(f"error: {e}") from None
        if args.interleave <= 0:
            raise SystemExit("error: --interleave takes a positive number of seconds")
    for _ in range(args.rounds):
        before = steal_s()
        if args.interleave:
            ours, bare = run_interleaved(args.variant, root, args.interleave)
            ours["steal_s"] = bare["steal_s"] = stolen(before)  # shared: turns alternate
        else:
            ours = run_ours(args.variant, root)
            ours["steal_s"], before = stolen(before), steal_s()
            bare = run_bare(root)
            bare["steal_s"] = stolen(before)
        ours["load_after"] = round(os.getloadavg()[0], 2)
        rounds.append(
            {
                "ours": ours,
                "bare": bare,
                "ratio": round(ours["variant_s"] / bare["variant_s"], 3),
                "step_ratio": _ratio(ours["train_steps_per_s"], bare["train_steps_per_s"]),
            }
        )
        print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
    result = {
        "benchmark": "side_by_side",
        "date": datetime.date.today().isoformat(),
        "variant": args.variant,
        "rounds": rounds,
        "interleave_s": args.interleave,
        "ratios": [r["ratio"] for r in rounds],
        "step_ratios": [r["step_ratio"] for r in rounds],
        "load_start": [round(v, 2) for v in load_start],
        "load_end": [round(v, 2) for v in os.getloadavg()],
    }
    line = json.dumps(result)
    print(line)
    folder = Path(os.environ.get("DDPM_BENCH_RESULTS", Path(__file__).parent / "results"))
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    (folder / f"side-by-side-{stamp}.json").write_text(line + "\n")


def _ratio(ours: float | None, bare: float | None) -> float | None:
    return round(ours / bare, 3) if ours and bare else None


if __name__ == "__main__":
    main()
