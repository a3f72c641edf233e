"""Rebuild the results table of benchmarks/README.md from benchmarks/results/*.json."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
START, END = "<!-- results:start -->", "<!-- results:end -->"
RUN_KEYS = {"date", "machine", "net", "settings", "rows"}
ROW_KEYS = {"figure", "ours", "diffusers", "ratio", "limit", "projection_hours", "projection",
            "peak_memory_mb"}  # fmt: skip


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}g}" if value < 1000 else f"{value:,.0f}"


def _run_result(path: Path) -> dict | None:
    """The results file of ``benchmarks.run`` at ``path``, or None for any other file.

    Other benchmarks write their own JSON beside these (some with ``rows`` of another shape):
    a file is taken only when it has every key the table reads.
    """
    try:
        r = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(r, dict) or not r.keys() >= RUN_KEYS or not isinstance(r["rows"], list):
        return None
    if not isinstance(r["settings"], dict) or not {"batch", "threads"} <= r["settings"].keys():
        return None
    if not all(isinstance(row, dict) and row.keys() >= ROW_KEYS for row in r["rows"]):
        return None
    return r


def table(results: Path = HERE / "results") -> str:
    """One Markdown row per figure of every ``benchmarks.run`` results file, newest first."""
    head = (
        "| date | device | net | settings | figure | ours | diffusers | ratio | limit | "
        "projection | peak memory (MB) |\n|" + " --- |" * 11
    )
    lines = [head]
    for path in sorted(results.glob("*.json"), reverse=True):
        r = _run_result(path)
        if r is None:  # another benchmark's result (stage_step.py, forward_cpu.py, ...)
            continue
        s = r["settings"]
        settings = f"batch {s['batch']}, {s['threads']} thr" + "".join(
            f", {k}" for k in ("bf16", "channels_last", "compile") if s.get(k)
        )
        for row in r["rows"]:
            hours = row["projection_hours"]
            projection = f"{_num(hours)} h for {row['projection']}" if hours else "—"
            lines.append(
                f"| {r['date']} | {r['machine']} | {r['net']} | {settings} | {row['figure']} | "
                f"{_num(row['ours'])} | {_num(row['diffusers'])} | {_num(row['ratio'])} | "
                f"{_num(row['limit'])} | {projection} | {_num(row['peak_memory_mb'], 4)} |"
            )
    return "\n".join(lines)


def update_readme(readme: Path = HERE / "README.md", results: Path = HERE / "results") -> None:
    """Replace the text between the results markers of ``readme`` with :func:`table`."""
    text = readme.read_text()
    before, _, rest = text.partition(START)
    _, _, after = rest.partition(END)
    readme.write_text(f"{before}{START}\n{table(results)}\n{END}{after}")
