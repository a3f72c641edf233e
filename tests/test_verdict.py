"""The verdict rule (pipeline.report.verdict) on crafted numbers: every outcome reachable, the
boundaries on the right side, and the markdown/tags of built tables."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from pipeline.report import paper, tables, verdict
from pipeline.report.verdict import (
    INCONCLUSIVE,
    K_ERRORS,
    MAX_RELATIVE_ERROR,
    NOT_REPRODUCED,
    REPRODUCED,
    STAND_IN,
    judge,
)

PAPER = 5.0
EDGE = MAX_RELATIVE_ERROR * PAPER  # 0.5: the widest error that still decides


def outcome(*args, **kwargs) -> str | None:
    found = judge(*args, **kwargs)
    return None if found is None else found.outcome


def test_every_outcome_is_reachable():
    assert outcome(5.1, 0.1, PAPER, lower_is_better=True) == REPRODUCED
    assert outcome(6.0, 0.1, PAPER, lower_is_better=True) == NOT_REPRODUCED
    assert outcome(5.0, 1.0, PAPER, lower_is_better=True) == INCONCLUSIVE
    assert outcome(5.0, 0.1, PAPER, stand_in=True) == STAND_IN
    assert outcome(5.0, 0.1, None) is None  # the paper has no number: nothing to judge
    assert set(verdict.OUTCOMES) == {REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, STAND_IN}


def test_boundary_of_the_difference():
    err = 0.25
    at = PAPER + K_ERRORS * err  # exactly 2 errors above: reproduced
    assert outcome(at, err, PAPER, lower_is_better=True) == REPRODUCED
    beyond = math.nextafter(at, math.inf)
    assert outcome(beyond, err, PAPER, lower_is_better=True) == NOT_REPRODUCED
    below = PAPER - K_ERRORS * err  # the same distance on the worse side of IS
    assert outcome(below, err, PAPER, lower_is_better=False) == REPRODUCED
    assert outcome(math.nextafter(below, -math.inf), err, PAPER, lower_is_better=False) == (
        NOT_REPRODUCED
    )


def test_boundary_of_the_relative_error():
    assert outcome(PAPER, EDGE, PAPER) == REPRODUCED  # exactly 10 %: still decides
    assert outcome(PAPER, math.nextafter(EDGE, 1.0), PAPER) == INCONCLUSIVE
    # the paper's error counts: 0.3 and 0.4 combine to 0.5 (at the edge), 0.41 past it
    assert outcome(PAPER, 0.3, PAPER, 0.4) == REPRODUCED
    assert outcome(PAPER, 0.3, PAPER, 0.41) == INCONCLUSIVE


def test_combined_error_widens_the_band():
    # |diff| 0.19; ours 0.06 alone: 2 errors = 0.12; with the paper's 0.08: 2 x 0.1 = 0.2
    assert outcome(9.27, 0.06, 9.46, lower_is_better=False) == NOT_REPRODUCED
    assert outcome(9.27, 0.06, 9.46, 0.08, lower_is_better=False) == REPRODUCED


@pytest.mark.parametrize(
    "figure, ours, expected",
    [
        ("FID", 2.0, REPRODUCED),  # lower FID than the paper's 5: better
        ("FID", 8.0, NOT_REPRODUCED),
        ("NLL test bpd", 4.0, REPRODUCED),
        ("NLL test bpd", 6.0, NOT_REPRODUCED),
        ("IS", 8.0, REPRODUCED),  # higher IS: better
        ("IS", 2.0, NOT_REPRODUCED),
        ("rate bpd", 2.0, NOT_REPRODUCED),  # no better direction: only the band counts
        ("rate bpd", 8.0, NOT_REPRODUCED),
    ],
)
def test_better_is_reproduced_by_direction(figure, ours, expected):
    assert outcome(ours, 0.1, PAPER, lower_is_better=verdict.direction(figure)) == expected


def test_missing_values_and_errors_are_inconclusive_and_say_why():
    assert judge(None, 0.1, PAPER) == verdict.Verdict(INCONCLUSIVE, "no value of ours")
    assert judge(PAPER, None, PAPER).reason == "no error estimate of ours"
    assert judge(PAPER, float("nan"), PAPER).outcome == INCONCLUSIVE
    assert judge(5.1, 0.1, float("nan")) is None
    assert "2 errors" in judge(6.0, 0.1, PAPER, lower_is_better=True).reason


def built_tables() -> dict:
    cols = ["variant", "FID paper", "FID ours", "FID ours err", "FID ours n", "FID verdict"]
    rows = [
        ["a", 3.17, 3.2, 0.05, 50000.0, REPRODUCED],
        ["b", 3.17, 4.0, 0.05, 50000.0, NOT_REPRODUCED],
        ["c", None, 4.0, 0.05, 50000.0, None],  # the paper leaves it empty
        ["d", 3.17, 4.0, 0.05, 64.0, STAND_IN],
    ]
    t4 = pd.DataFrame(
        [[100, 0.5, 0.6, None, None, INCONCLUSIVE]],
        columns=[
            "steps",
            *(f"rate bpd {c}" for c in ("paper", "ours", "ours err", "ours n", "verdict")),
        ],
    )
    return {"table2": (pd.DataFrame(rows, columns=cols), "T2"), "table4": (t4, "T4")}


def test_collect_markdown_and_tags_of_built_tables():
    entries = verdict.collect(built_tables())
    assert [(e.table, e.row, e.figure, e.verdict.outcome) for e in entries] == [
        ("table2", "a", "FID", REPRODUCED),
        ("table2", "b", "FID", NOT_REPRODUCED),
        ("table2", "d", "FID", STAND_IN),
        ("table4", "steps 100", "rate bpd", INCONCLUSIVE),
    ]
    md = verdict.to_markdown(entries, "Verdict")
    assert "**reproduced 1, not reproduced 1, inconclusive 1, n/a (stand-in) 1**" in md
    assert "| table2 | b | FID | not reproduced | ours 4 ± 0.05 (combined) vs paper 3.17" in md
    assert len(md.splitlines()) <= 50  # one screen
    tags = verdict.tags(entries)
    assert tags["ddpm.verdict.table4.steps_100.rate_bpd"] == INCONCLUSIVE
    assert tags["ddpm.verdict"] == verdict.summary(entries)


def test_collect_refuses_a_table_whose_column_disagrees_with_the_rule():
    built = built_tables()
    built["table2"][0].loc[0, "FID verdict"] = NOT_REPRODUCED  # 3.2 +- 0.05 is reproduced
    with pytest.raises(AssertionError):
        verdict.collect(built)


def test_table4_judges_rate_and_distortion_with_their_standard_errors():
    """Table 4's figures carry their standard errors over the test images (the verdict's e):
    a rate within 2 errors of the paper's reproduces, a distortion off by more does not, and a
    step count without an error stays inconclusive."""

    v = paper.TABLE4_VARIANT
    metrics = {
        "nll_images": 10000.0,
        tables.rd_metric("rate_bpd", 1000): 1.78,  # paper 1.77581
        tables.rd_metric("rate_bpd_se", 1000): 0.004,  # |diff| 0.0042 <= 2 x 0.004
        tables.rd_metric("rmse_per_image", 1000): 1.2,  # paper 0.95136
        tables.rd_metric("rmse_per_image_se", 1000): 0.01,  # 0.249 > 2 x 0.01
        tables.rd_metric("rate_bpd", 500): 0.0072,  # paper 0.00716, no error logged
    }
    runs = pd.DataFrame([{f"metrics.{k}": x for k, x in metrics.items()}], index=[v])
    t4 = tables.table4(runs, 1000, (1000, 500)).set_index("steps")
    assert t4.loc[1000, "rate bpd ours err"] == 0.004 and t4.loc[1000, "rate bpd ours n"] == 1e4
    assert t4.loc[1000, "rate bpd verdict"] == REPRODUCED
    assert t4.loc[1000, "RMSE verdict"] == NOT_REPRODUCED
    assert t4.loc[500, "rate bpd verdict"] == INCONCLUSIVE
    assert "1.780 ± 0.004 (10000)" in tables.to_markdown(t4.reset_index(), "T4")
