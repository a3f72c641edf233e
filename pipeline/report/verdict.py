"""Did it reproduce? Two one-sided tests against a margin declared before the run.

For each of the paper's numbers (docs/report-and-mlflow.md, "Reading the verdict", says why):

1. The paper gives no number: no verdict (None).
2. Our run is a stand-in (smoke/tiny scale, stand-in feature network): ``n/a (stand-in)``; the
   margin is still shown beside it.
3. We have no number, or no error for it: ``inconclusive``.
4. The ``confidence`` interval (params ``report.confidence``, default 90 %: two one-sided tests
   at 5 % each) of d = ours - paper is d +- q * se, with se = sqrt(se_ours^2 + se_paper^2)
   (:func:`ours_error`: one training run's standard error; se_paper: the paper's IS split std
   / sqrt(its splits), 0 where the paper states none) and q the normal quantile, or Student's t
   with seeds - 1 degrees of freedom when se_ours is the std of several seeds. With the margin
   m (params ``report.margin``; "10%" is 10 % of the paper's value):

   - the interval inside [-m, m]: ``reproduced``;
   - the interval beyond +-m on the better side (lower FID and NLL, higher IS):
     ``better than the paper``, a pass for the row with a note to check the evaluation;
   - the interval beyond +-m on the worse side (either side for Table 4): ``not reproduced``;
   - otherwise (it straddles +m or -m): ``inconclusive``.

Boundaries: an interval ending exactly at +-m lies inside (reproduced); one starting exactly
at +-m is not outside (inconclusive).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

from pipeline.config import Amount, ReportConfig, parse_amount

Outcome = Literal[
    "reproduced", "better than the paper", "not reproduced", "inconclusive", "n/a (stand-in)"
]
REPRODUCED: Final = "reproduced"
BETTER: Final = "better than the paper"
NOT_REPRODUCED: Final = "not reproduced"
INCONCLUSIVE: Final = "inconclusive"
STAND_IN: Final = "n/a (stand-in)"
OUTCOMES: tuple[Outcome, ...] = (REPRODUCED, BETTER, NOT_REPRODUCED, INCONCLUSIVE, STAND_IN)
PASSES: tuple[Outcome, ...] = (REPRODUCED, BETTER)  # the row's claim holds
CHECK_EVALUATION = (
    "check the evaluation (FID/IS: reference set, sample count, Inception weights; NLL: every "
    "term of the bound, the test split) before taking it as a result"
)

LOWER_IS_BETTER = {"FID": True, "NLL": True, "IS": False}  # by the figure's first word
# a table's figure (its first word) -> its key in params.yaml's report.margin / report.seed_std
FIGURE_KEYS = {
    "FID": "fid",
    "IS": "inception_score",
    "NLL": "nll",
    "rate": "rate",
    "RMSE": "distortion",
}

# The comparison of two reproductions (pipeline.report.compare): B - A within K_ERRORS combined
# errors. Not the verdict: both sides there are our runs, with errors of the same kind.
K_ERRORS = 2.0


@dataclass(frozen=True)
class Verdict:
    """One verdict: the outcome, its reason in words, the margin it was judged with (in the
    figure's units; None: the paper gives no number) and what our error rests on."""

    outcome: Outcome
    reason: str
    margin: float | None = None
    basis: str = ""


@dataclass(frozen=True)
class OursError:
    """One training run's standard error of our figure, the degrees of freedom of its quantile
    (None: normal) and what it rests on, in words."""

    se: float | None
    df: float | None
    basis: str


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def amount(value: Amount, paper: float) -> float:
    """A margin or seed std of params (a number, or "<p>%" of the paper's value ``paper``) in
    the figure's units."""
    number, relative = parse_amount(value)
    return number * abs(paper) if relative else number


def margin_text(margin: float) -> str:
    """``± 0.317``: a margin as the tables, verdict.md and the tags show it (3 digits)."""
    return f"± {margin:.3g}"


def figure_key(figure: str) -> str:
    """The params key of a table's figure ("FID train" -> fid, "RMSE" -> distortion)."""
    return FIGURE_KEYS[figure.split()[0]]


def direction(figure: str) -> bool | None:
    """Whether lower is better for a table's figure name ("FID train", "NLL test bpd", "IS");
    None: neither (Table 4's rate and distortion)."""
    return LOWER_IS_BETTER.get(figure.split()[0])


def sampling_se(figure: str, err: float | None, n: float | None) -> float | None:
    """The standard error of one run's figure from the tables' error of it: IS's error is the
    std over its ``n`` splits (the paper's convention), so its standard error is err / sqrt(n);
    FID's (bootstrap), NLL's and Table 4's (over the images) already are standard errors."""
    if _missing(err):
        return None
    assert err is not None  # _missing(None) is True
    if figure.split()[0] == "IS":
        return None if _missing(n) or not n else err / math.sqrt(n)
    return err


def ours_error(
    figure: str,
    err: float | None,
    n: float | None,
    *,
    seeds: int,
    paper: float | None,
    report: ReportConfig,
    published: bool = False,
) -> OursError:
    """One training run's standard error of our ``figure`` and what it rests on.

    ``seeds`` > 1: ``err`` is the std of the seeds (pipeline.report.tables.by_variant), the
    spread of one training run itself, with seeds - 1 degrees of freedom. One seed: the sampling
    error (:func:`sampling_se`), combined with params' declared ``report.seed_std`` of the
    figure when there is one, and the basis says the verdict rests on one seed. Published
    weights have no training seed: the sampling error alone."""
    key = figure_key(figure)
    if seeds > 1:
        return OursError(err, seeds - 1.0, f"{seeds} training seeds: their std")
    se = sampling_se(figure, err, n)
    if published:
        return OursError(se, None, "published weights: sampling error only (no training seed)")
    declared = getattr(report.seed_std, key)
    if declared is None or paper is None or _missing(paper):
        basis = f"one training seed: sampling error only (no report.seed_std.{key} declared)"
        return OursError(se, None, basis)
    spread = amount(declared, paper)
    basis = f"one training seed + declared seed std {_fmt(spread)} (report.seed_std.{key})"
    return OursError(None if se is None else math.hypot(se, spread), None, basis)


def quantile(confidence: float, df: float | None = None) -> float:
    """q of the two-sided ``confidence`` interval: the normal (df None) or Student's t quantile
    at (1 + confidence) / 2 (each one-sided test at (1 - confidence) / 2)."""
    p = (1.0 + confidence) / 2.0
    if df is None:
        from statistics import NormalDist

        return NormalDist().inv_cdf(p)
    from scipy.stats import t

    return float(t.ppf(p, df))


def judge(
    ours: float | None,
    ours_se: float | None,
    paper: float | None,
    paper_se: float | None = None,
    *,
    margin: float,
    lower_is_better: bool | None = None,
    stand_in: bool = False,
    confidence: float = 0.90,
    df: float | None = None,
    basis: str = "",
) -> Verdict | None:
    """The verdict on our value ``ours`` (standard error ``ours_se``) against the paper's
    ``paper`` (``paper_se``) with the equivalence ``margin`` (figure units): see the module
    docstring. ``lower_is_better`` None: no direction is better (Table 4). None when the paper
    gives no number."""
    if _missing(paper):
        return None
    if stand_in:
        reason = "stand-in run: not comparable to published numbers"
        return Verdict(STAND_IN, reason, margin, basis)
    if _missing(ours):
        return Verdict(INCONCLUSIVE, "no value of ours", margin, basis)
    if _missing(ours_se):
        return Verdict(INCONCLUSIVE, "no error estimate of ours", margin, basis)
    assert ours is not None and ours_se is not None and paper is not None  # _missing(None)
    se = math.hypot(ours_se, 0.0 if paper_se is None or _missing(paper_se) else paper_se)
    q = quantile(confidence, df)
    diff = ours - paper
    low, high = diff - q * se, diff + q * se
    numbers = (
        f"ours {_fmt(ours)} vs paper {_fmt(paper)}: diff {diff:+.4g}, {confidence:.0%} CI "
        f"[{_fmt(low)}, {_fmt(high)}] (± {q:.3g} × se {_fmt(se)})"
    )
    if -margin <= low and high <= margin:
        return Verdict(REPRODUCED, f"{numbers} inside ± {_fmt(margin)}", margin, basis)
    if low > margin or high < -margin:
        better = lower_is_better is not None and (high < -margin) == lower_is_better
        if better:
            reason = f"{numbers} beyond ± {_fmt(margin)}, better: {CHECK_EVALUATION}"
            return Verdict(BETTER, reason, margin, basis)
        return Verdict(NOT_REPRODUCED, f"{numbers} outside ± {_fmt(margin)}", margin, basis)
    return Verdict(INCONCLUSIVE, f"{numbers} straddles ± {_fmt(margin)}", margin, basis)


def agree(diff: float, err: float) -> bool:
    """Whether a difference of two reproductions lies within K_ERRORS combined errors ``err``
    (boundary included): pipeline.report.compare's band, not the verdict's."""
    return abs(diff) <= K_ERRORS * err


def _missing(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


# ---------------------------------------------------------------------------------------------
# The verdicts of built tables: reports/verdict.md and the parent run's tags.

TAG_PREFIX = "ddpm.verdict"
MARGIN_PREFIX = "ddpm.margin"


@dataclass(frozen=True)
class Entry:
    """One of the paper's numbers judged: which table, row and figure, and the verdict."""

    table: str  # the table's stem: table1, table2, table3, table4
    row: str  # the variant (Table 4: "steps <n>")
    figure: str  # "FID", "IS", "NLL test bpd", ...
    verdict: Verdict


def collect(built: dict) -> list[Entry]:
    """Every verdict of ``built`` ({stem: (table DataFrame, title)}, pipeline.report.tables'
    columns ``<figure> verdict``, ``<figure> margin``, ``<figure> verdict basis`` and
    ``<figure> verdict reason``)."""
    out = []
    for stem, (table, _title) in built.items():
        figures = [c.removesuffix(" verdict") for c in table.columns if c.endswith(" verdict")]
        for _, row in table.iterrows():
            label = f"steps {int(row['steps'])}" if "steps" in row else str(row["variant"])
            for figure in figures:
                outcome = row[f"{figure} verdict"]
                if not isinstance(outcome, str):
                    continue
                if outcome not in OUTCOMES:
                    raise ValueError(f"{stem} {label} {figure}: unknown verdict {outcome!r}")
                found = Verdict(
                    outcome,  # checked against OUTCOMES above
                    _text(row.get(f"{figure} verdict reason")),
                    _num(row.get(f"{figure} margin")),
                    _text(row.get(f"{figure} verdict basis")),
                )
                out.append(Entry(stem, label, figure, found))
    return out


def _num(x: object) -> float | None:
    return float(x) if isinstance(x, int | float) and not math.isnan(x) else None


def _text(x: object) -> str:
    return x if isinstance(x, str) else ""


def counts(entries: list[Entry]) -> dict[str, int]:
    """How many verdicts of each outcome, in OUTCOMES order (zeros left out)."""
    found = {o: sum(e.verdict.outcome == o for e in entries) for o in OUTCOMES}
    return {o: n for o, n in found.items() if n}


def summary(entries: list[Entry]) -> str:
    """``reproduced 3, better than the paper 1, not reproduced 1, inconclusive 2`` (or
    ``no verdict``)."""
    return ", ".join(f"{o} {n}" for o, n in counts(entries).items()) or "no verdict"


def margins_line(report: ReportConfig) -> str:
    """params' declarations in one line: margins, seed stds, confidence."""
    margins = ", ".join(f"{k} {v}" for k, v in vars(report.margin).items())
    declared = [f"{k} {v}" for k, v in vars(report.seed_std).items() if v is not None]
    seeds = ", ".join(declared) if declared else "none declared"
    return f"margins {margins}; seed std {seeds}; confidence {report.confidence:.0%}"


def to_markdown(entries: list[Entry], title: str, report: ReportConfig | None = None) -> str:
    """reports/verdict.md: the rule and params' margins, the counts, one line per verdict with
    its margin, what its error rests on and its reason."""
    report = report or ReportConfig()
    lines = [
        f"# {title}",
        "",
        f"Rule (pipeline/report/verdict.py): the {report.confidence:.0%} interval of ours - "
        "paper inside ± margin: reproduced; beyond it on the better side (FID, NLL lower; IS "
        "higher): better than the paper (a pass: check the evaluation); beyond it on the worse "
        "side: not reproduced; else inconclusive. Stand-in runs get n/a. "
        "docs/report-and-mlflow.md, Reading the verdict.",
        "",
        f"Declared in params.yaml `report`: {margins_line(report)}.",
        "",
        f"**{summary(entries)}** ({sum(e.verdict.outcome in PASSES for e in entries)} pass)",
        "",
        "| table | row | figure | verdict | margin | error from | reason |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in entries:
        v = e.verdict
        margin = "—" if v.margin is None else margin_text(v.margin)
        cells = (e.table, e.row, e.figure, v.outcome, margin, v.basis, v.reason)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _key(prefix: str, entry: Entry) -> str:
    parts = (entry.table, entry.row, entry.figure)
    return ".".join([prefix, *(p.replace(" ", "_") for p in parts)])


def tag_key(entry: Entry) -> str:
    """The parent run's tag of ``entry``: ddpm.verdict.<table>.<row>.<figure> (MLflow's
    allowed characters: spaces become underscores)."""
    return _key(TAG_PREFIX, entry)


def tags(entries: list[Entry], report: ReportConfig | None = None) -> dict[str, str]:
    """The MLflow tags of the verdicts: one per entry (its outcome), beside it
    ddpm.margin.<table>.<row>.<figure> (its margin), ``ddpm.verdict`` with the counts and
    ``ddpm.margin`` with params' declarations."""
    report = report or ReportConfig()
    out = {TAG_PREFIX: summary(entries), MARGIN_PREFIX: margins_line(report)}
    for e in entries:
        out[tag_key(e)] = e.verdict.outcome
        if e.verdict.margin is not None:
            out[_key(MARGIN_PREFIX, e)] = margin_text(e.verdict.margin)
    return out
