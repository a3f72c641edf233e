"""Did it reproduce? One rule, applied to each of the paper's numbers beside ours.

The rule (docs/report-and-mlflow.md, "Reading the verdict", says why):

1. The paper gives no number: no verdict (None).
2. Our run is a stand-in (smoke/tiny scale, stand-in feature network): ``n/a (stand-in)``.
3. We have no number, or no error for it: ``inconclusive``.
4. The combined error e = sqrt(ours_err^2 + paper_err^2) (the paper's error: IS's split std;
   0 where the paper states none) is wider than MAX_RELATIVE_ERROR of the paper's value:
   ``inconclusive`` (too noisy to tell either way).
5. |ours - paper| <= K_ERRORS * e, or ours is better (lower FID and NLL, higher IS):
   ``reproduced``.
6. Otherwise ``not reproduced``.

Boundaries: a difference of exactly K_ERRORS * e reproduces; an error of exactly
MAX_RELATIVE_ERROR * |paper| is not yet inconclusive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
STAND_IN = "n/a (stand-in)"
OUTCOMES = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, STAND_IN)

K_ERRORS = 2.0  # the paper's value within ours +- 2 combined errors (~95 % for a Gaussian)
MAX_RELATIVE_ERROR = 0.10  # a combined error above 10 % of the paper's value decides nothing

LOWER_IS_BETTER = {"FID": True, "NLL": True, "IS": False}  # by the figure's first word


@dataclass(frozen=True)
class Verdict:
    """One verdict: the outcome (one of OUTCOMES) and its reason in words."""

    outcome: str
    reason: str


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def judge(
    ours: float | None,
    ours_err: float | None,
    paper: float | None,
    paper_err: float | None = None,
    *,
    lower_is_better: bool | None = None,
    stand_in: bool = False,
) -> Verdict | None:
    """The verdict on our value ``ours`` +- ``ours_err`` against the paper's ``paper`` +-
    ``paper_err`` (see the module docstring); ``lower_is_better`` None: no direction is better
    (Table 4's rate and distortion). None when the paper gives no number."""
    if _missing(paper):
        return None
    if stand_in:
        return Verdict(STAND_IN, "stand-in run: not comparable to published numbers")
    if _missing(ours):
        return Verdict(INCONCLUSIVE, "no value of ours")
    if _missing(ours_err):
        return Verdict(INCONCLUSIVE, "no error estimate of ours")
    err = math.hypot(ours_err, 0.0 if _missing(paper_err) else paper_err)
    diff = ours - paper
    numbers = f"ours {_fmt(ours)} ± {_fmt(err)} (combined) vs paper {_fmt(paper)}"
    if err > MAX_RELATIVE_ERROR * abs(paper):
        limit = f"{MAX_RELATIVE_ERROR:.0%} of the paper's value"
        return Verdict(INCONCLUSIVE, f"{numbers}: error wider than {limit}")
    if agree(diff, err):
        return Verdict(REPRODUCED, f"{numbers}: |diff| {_fmt(abs(diff))} <= {K_ERRORS:g} errors")
    if lower_is_better is not None and (diff < 0) == lower_is_better:
        return Verdict(REPRODUCED, f"{numbers}: ours better by {_fmt(abs(diff))}")
    return Verdict(NOT_REPRODUCED, f"{numbers}: |diff| {_fmt(abs(diff))} > {K_ERRORS:g} errors")


def agree(diff: float, err: float) -> bool:
    """Whether a difference lies within K_ERRORS combined errors ``err`` (boundary included):
    the band of :func:`judge` and of the comparison of two reproductions."""
    return abs(diff) <= K_ERRORS * err


def direction(figure: str) -> bool | None:
    """Whether lower is better for a table's figure name ("FID train", "NLL test bpd", "IS")."""
    return LOWER_IS_BETTER.get(figure.split()[0])


def _missing(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


# ---------------------------------------------------------------------------------------------
# The verdicts of built tables: reports/verdict.md and the parent run's tags.

TAG_PREFIX = "ddpm.verdict"


@dataclass(frozen=True)
class Entry:
    """One of the paper's numbers judged: which table, row and figure, and the verdict."""

    table: str  # the table's stem: table1, table2, table3, table4
    row: str  # the variant (Table 4: "steps <n>")
    figure: str  # "FID", "IS", "NLL test bpd", ...
    verdict: Verdict


def collect(built: dict) -> list[Entry]:
    """Every verdict of ``built`` ({stem: (table DataFrame, title)}, pipeline.report.tables'
    columns ``<figure> verdict``), with its reason re-derived by :func:`judge` from the row."""
    out = []
    for stem, (table, _title) in built.items():
        figures = [c.removesuffix(" verdict") for c in table.columns if c.endswith(" verdict")]
        for _, row in table.iterrows():
            label = f"steps {int(row['steps'])}" if "steps" in row else str(row["variant"])
            for figure in figures:
                outcome = row[f"{figure} verdict"]
                if not isinstance(outcome, str):
                    continue
                found = judge(
                    _num(row.get(f"{figure} ours")),
                    _num(row.get(f"{figure} ours err")),
                    _num(row.get(f"{figure} paper")),
                    _num(row.get(f"{figure} paper err")),
                    lower_is_better=direction(figure),
                    stand_in=outcome == STAND_IN,
                )
                assert found is not None and found.outcome == outcome, (stem, label, figure)
                out.append(Entry(stem, label, figure, found))
    return out


def _num(x: object) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def counts(entries: list[Entry]) -> dict[str, int]:
    """How many verdicts of each outcome, in OUTCOMES order (zeros left out)."""
    found = {o: sum(e.verdict.outcome == o for e in entries) for o in OUTCOMES}
    return {o: n for o, n in found.items() if n}


def summary(entries: list[Entry]) -> str:
    """``reproduced 3, not reproduced 1, inconclusive 2`` (or ``no verdict``)."""
    return ", ".join(f"{o} {n}" for o, n in counts(entries).items()) or "no verdict"


def to_markdown(entries: list[Entry], title: str) -> str:
    """reports/verdict.md: the rule in one line, one line per verdict with its reason."""
    lines = [
        f"# {title}",
        "",
        f"Rule (pipeline/report/verdict.py): reproduced when |ours - paper| <= {K_ERRORS:g} "
        "combined errors or ours is better (FID, NLL lower; IS higher); inconclusive when the "
        f"combined error exceeds {MAX_RELATIVE_ERROR:.0%} of the paper's value or is unknown; "
        "stand-in runs get n/a. docs/report-and-mlflow.md, Reading the verdict.",
        "",
        f"**{summary(entries)}**",
        "",
        "| table | row | figure | verdict | reason |",
        "| --- | --- | --- | --- | --- |",
    ]
    for e in entries:
        reason = e.verdict.reason.replace("|", "\\|")
        lines.append(f"| {e.table} | {e.row} | {e.figure} | {e.verdict.outcome} | {reason} |")
    return "\n".join(lines) + "\n"


def tag_key(entry: Entry) -> str:
    """The parent run's tag of ``entry``: ddpm.verdict.<table>.<row>.<figure> (MLflow's
    allowed characters: spaces become underscores)."""
    parts = (entry.table, entry.row, entry.figure)
    return ".".join([TAG_PREFIX, *(p.replace(" ", "_") for p in parts)])


def tags(entries: list[Entry]) -> dict[str, str]:
    """The MLflow tags of the verdicts: one per entry (its outcome) and ``ddpm.verdict`` with
    the counts."""
    return {TAG_PREFIX: summary(entries), **{tag_key(e): e.verdict.outcome for e in entries}}
