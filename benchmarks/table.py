"""Rebuild the results table of benchmarks/README.md from benchmarks/results/*.json."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}g}" if value < 1000 else f"{value:,.0f}"


def table() -> str:
    """One Markdown row per figure of every results file, newest first."""
    head = (
        "| date | device | net | settings | figure | ours | diffusers | ratio | limit | "
        "projection | peak memory (MB) |\n|" + " --- |" * 11
    )
    lines = [head]
    for path in sorted((HERE / "results").glob("*.json"), reverse=True):
        r = json.loads(path.read_text())
        if "rows" not in r:  # another kind of result (bf16_fid.py)
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


def update_readme(readme: Path = HERE / "README.md") -> None:
    """Replace the text between the results markers of ``readme`` with :func:`table`."""
    text = readme.read_text()
    before, _, rest = text.partition(START)
    _, _, after = rest.partition(END)
    readme.write_text(f"{before}{START}\n{table()}\n{END}{after}")
