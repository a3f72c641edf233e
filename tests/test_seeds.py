"""Training seeds (params.yaml ``seeds`` / ``extra_seeds``): the check between them, the DVC
stages of the further seeds, and the report's mean ± std over seeds against numpy.

The real run (two variants, seeds [0, 1], ``stages.repro`` in a copy of the repo) is the slow
test at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from repo_copy import PARAMS, ROOT, env

from pipeline.config import config_from_dict
from pipeline.errors import ConfigError
from pipeline.report import tables
from pipeline.report.verdict import INCONCLUSIVE, REPRODUCED, judge

RAW = yaml.safe_load(PARAMS.read_text())


def params(**top) -> dict:
    """A deep copy of params.yaml with top-level keys replaced."""
    out = yaml.safe_load(yaml.safe_dump(RAW))
    out.update(top)
    return out


# ---------------------------------------------------------------------------------------------
# seeds against extra_seeds and train.seed: checked at load, one error line naming the -S


def test_default_is_one_seed_and_todays_paths():
    cfg = config_from_dict(params())
    assert cfg.seeds == (0,) and cfg.main_seed == 0 == cfg.train.seed
    assert cfg.run_key("eps_fixed_mse") == "eps_fixed_mse"
    assert cfg.stage_name("train", "eps_fixed_mse") == "train@eps_fixed_mse"
    assert cfg.with_seed(None) is cfg and cfg.with_seed(0) is cfg


def test_a_further_seed_trains_with_it_under_its_own_name():
    cfg = config_from_dict(params(seeds=[0, 3], extra_seeds=[3])).with_seed(3)
    assert cfg.train.seed == 3 and cfg.main_seed == 0
    assert cfg.run_key("eps_fixed_mse") == "eps_fixed_mse-s3"
    assert cfg.stage_name("sample", "eps_fixed_mse") == "sample_seed@eps_fixed_mse-3"


@pytest.mark.parametrize(
    ("top", "words"),
    [
        ({"seeds": [0, 1]}, "pass -S 'extra_seeds=[1]'"),  # extra_seeds left at []
        ({"seeds": [0, 1], "extra_seeds": [2]}, "pass -S 'extra_seeds=[1]'"),
        ({"seeds": [0], "extra_seeds": [1]}, "pass -S 'extra_seeds=[]'"),
        ({"seeds": [4, 1], "extra_seeds": [1]}, "pass -S presets.smoke.train.seed=4"),
        ({"seeds": [0, 0], "extra_seeds": [0]}, "distinct integers >= 0"),
        ({"seeds": [], "extra_seeds": []}, "non-empty list"),
        ({"seeds": [0, -1], "extra_seeds": [-1]}, "distinct integers >= 0"),
        ({"seeds": 1}, "non-empty list"),
    ],
)
def test_seeds_and_extra_seeds_must_agree(top, words):
    with pytest.raises(ConfigError, match=r"params\.yaml") as e:
        config_from_dict(params(**top))
    assert words in str(e.value)


def test_a_seed_not_in_seeds_is_refused():
    cfg = config_from_dict(params(seeds=[0, 1], extra_seeds=[1]))
    with pytest.raises(ConfigError, match=r"--seed 2 is not one of params.yaml's seeds \[0, 1\]"):
        cfg.with_seed(2)


def test_published_weights_have_no_further_seeds():
    with pytest.raises(ConfigError, match="no training seed"):
        config_from_dict(params(seeds=[0, 1], extra_seeds=[1]), "published")


def test_a_variant_named_like_a_seed_output_is_refused():
    """Further seeds' outputs are <variant>-s<seed>; a variant's name may not hold a "-"."""
    raw = params(seeds=[0, 1], extra_seeds=[1])
    raw["variants"]["eps_fixed_mse-s1"] = raw["variants"]["eps_fixed_mse"]
    with pytest.raises(ConfigError, match="'eps_fixed_mse-s1' is not a plain name"):
        config_from_dict(raw)


def test_the_disagreement_is_one_error_line_before_any_work(tmp_path):
    """What a user meets: ``dvc exp run -S 'seeds=[0,1]'`` alone stops at the first stage."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params(seeds=[0, 1])))
    cmd = [sys.executable, "-m", "stages.train", "--variant", "eps_fixed_mse"]
    done = subprocess.run(
        [*cmd, "--params", str(path)], capture_output=True, text=True, env=env(), cwd=ROOT
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: params.yaml: extra_seeds ([]) must be seeds[1:] = [1]")
    assert "-S 'extra_seeds=[1]'" in lines[0]


# ---------------------------------------------------------------------------------------------
# dvc.yaml: the further seeds' stages mirror the main ones, under their own paths


def dvc_stages(tmp_path, top: dict) -> dict:
    """{stage name: (cmd, params, deps, outs as (path, persist, cache))} of dvc.yaml with
    params.yaml's ``top`` keys replaced (DVC's own index, as `dvc stage list` reads it)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    tmp_path.mkdir()
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params(**top)))
    Repo.init(str(tmp_path), no_scm=True).close()
    found = {}
    with Repo(str(tmp_path)) as repo:
        for s in repo.index.stages:
            found[s.addressing.split(":")[-1]] = (
                s.cmd,
                sorted(p for d in s.deps if isinstance(d, ParamsDependency) for p in d.params),
                sorted(d.def_path for d in s.deps if not isinstance(d, ParamsDependency)),
                sorted((o.def_path, o.persist, o.use_cache) for o in s.outs),
            )
    return found


def test_dvc_stages_of_seeds_0_and_1(tmp_path):
    """seeds [0, 1]: train_seed@<V>-1, sample_seed@<V>-1, evaluate_seed@<V>-1 for every variant,
    each the main stage's with ``--seed 1`` and <V>-s1 paths; the main stages as before."""
    default = dvc_stages(tmp_path / "a", {})
    two = dvc_stages(tmp_path / "b", {"seeds": [0, 1], "extra_seeds": [1]})
    assert not [n for n in default if "_seed@" in n]  # seeds [0]: no further stage
    assert {n: two[n] for n in default} == default  # the main stages (and dvc.lock) unchanged
    variants = list(RAW["variants"])
    extra = sorted(n for n in two if n not in default)
    assert extra == sorted(
        f"{s}_seed@{v}-1" for s in ("train", "sample", "evaluate") for v in variants
    )

    def renamed(items, v):
        return sorted(x.replace(v, f"{v}-s1") if isinstance(x, str) else x for x in items)

    for v in variants:
        for stage in ("train", "sample", "evaluate"):
            cmd, par, deps, outs = two[f"{stage}_seed@{v}-1"]
            main_cmd, main_par, main_deps, main_outs = default[f"{stage}@{v}"]
            assert cmd == f"{main_cmd} --seed 1"
            assert par == main_par  # the same params (train.seed's value is in the command)
            assert deps == renamed(main_deps, v)  # models/<V>-s1 ..., the rest shared
            assert outs == sorted((p.replace(v, f"{v}-s1"), *rest) for p, *rest in main_outs)
    assert ("models/eps_fixed_mse-s1", False, True) in two["train_seed@eps_fixed_mse-1"][3]
    assert "metrics" in default["report"][2]  # the report reads every seed's metrics/


# ---------------------------------------------------------------------------------------------
# The report: mean ± std over seeds, against numpy


def seed_runs(values: dict[str, list[float]]) -> pd.DataFrame:
    """A read_runs-like frame: one run per (variant, seed), FID and IS with their errors."""
    rows = []
    for variant, fids in values.items():
        for seed, fid in enumerate(fids):
            rows.append(
                {
                    "run_id": f"{variant}-{seed}",
                    "tags.ddpm.variant": variant,
                    "tags.ddpm.seed": str(seed),
                    "tags.stand_in": "false",
                    "metrics.fid_train": fid,
                    "metrics.fid_train_se": 0.01,
                    "metrics.n_samples": 50000.0,
                    "metrics.is_mean": 9.0 + seed,
                    "metrics.is_std": 0.1,
                    "metrics.is_splits": 10.0,
                    "metrics.nll_bpd": np.nan if seed else 3.7,  # one seed only has it
                }
            )
    frame = pd.DataFrame(rows)
    return frame.set_index("tags.ddpm.variant", drop=False).rename_axis("variant")


def test_mean_and_std_over_seeds_match_numpy():
    fids = {"eps_fixed_mse": [3.1, 3.4, 2.9], "xprev_fixed_kl": [13.0, 14.5]}
    runs = tables.by_variant(seed_runs(fids))
    assert list(runs.index) == ["eps_fixed_mse", "xprev_fixed_kl"]
    for v, values in fids.items():
        row = runs.loc[v]
        assert row["metrics.fid_train"] == pytest.approx(np.mean(values))
        assert row["metrics.fid_train_seed_std"] == pytest.approx(np.std(values, ddof=1))
        assert row["metrics.fid_train_seed_n"] == len(values)
        is_values = [9.0 + s for s in range(len(values))]
        assert row["metrics.is_mean_seed_std"] == pytest.approx(np.std(is_values, ddof=1))
        assert row["tags.ddpm.seeds"] == ", ".join(map(str, range(len(values))))
        # a metric only one seed has: that value, no spread, n 1 (its own error then)
        assert row["metrics.nll_bpd"] == 3.7 and row["metrics.nll_bpd_seed_n"] == 1
        assert np.isnan(row["metrics.nll_bpd_seed_std"])
    assert tables.error_metrics(runs, "eps_fixed_mse", "fid_train") == (
        "fid_train_seed_std",
        "fid_train_seed_n",
    )
    assert tables.error_metrics(runs, "eps_fixed_mse", "nll_bpd") == ("nll_bpd_se", "nll_images")


def test_one_seed_leaves_the_runs_as_they_were():
    runs = seed_runs({"eps_fixed_mse": [3.1], "xprev_fixed_kl": [13.0]})
    assert tables.by_variant(runs) is runs
    assert tables.error_metrics(runs, "eps_fixed_mse", "fid_train") == ERR_FID
    table = tables.table2(runs).set_index("variant")
    assert table.loc["eps_fixed_mse", "FID ours err"] == 0.01  # the bootstrap SE
    assert "seeds" not in table.loc["eps_fixed_mse", "note"]


ERR_FID = ("fid_train_se", "n_samples")


def test_table_cells_and_verdict_use_the_seed_std():
    fids = [3.1, 3.4, 2.9]
    runs = tables.by_variant(seed_runs({"eps_fixed_mse": fids}))
    t2 = tables.table2(runs).set_index("variant")
    mean, std = np.mean(fids), np.std(fids, ddof=1)
    assert t2.loc["eps_fixed_mse", "FID ours"] == pytest.approx(mean)
    assert t2.loc["eps_fixed_mse", "FID ours err"] == pytest.approx(std)
    assert t2.loc["eps_fixed_mse", "FID ours n"] == 3
    assert "mean ± std over 3 training seeds (0, 1, 2)" in t2.loc["eps_fixed_mse", "note"]
    # the seed std with t's 2 degrees of freedom: 90 % CI 3.133 - 3.17 +- 2.92 x 0.252 reaches
    # past the margin (+- 0.317): inconclusive; one run's bootstrap SE (0.01) would reproduce
    assert t2.loc["eps_fixed_mse", "FID verdict basis"] == "3 training seeds: their std"
    found = judge(mean, std, 3.17, margin=0.317, lower_is_better=True, df=2.0)
    assert t2.loc["eps_fixed_mse", "FID verdict"] == found.outcome == INCONCLUSIVE
    assert judge(mean, 0.01, 3.17, margin=0.317, lower_is_better=True).outcome == REPRODUCED
    md = tables.to_markdown(tables.table2(runs), "Table 2")
    assert f"| {mean:.3f} ± {std:.3f} (3) |" in md
    assert "the std of the seeds (ddof 1), n = seeds; that std is the verdict's error" in md


def test_compare_uses_the_seed_std_too():
    from pipeline.report.compare import Reproduction, side_by_side

    a = tables.by_variant(seed_runs({"eps_fixed_mse": [3.1, 3.4]}))
    b = seed_runs({"eps_fixed_mse": [3.2]})
    rows = side_by_side(Reproduction("a", "A", {}, a), Reproduction("b", "B", {}, b))
    fid = rows[rows["figure"].str.startswith("FID train")].iloc[0]
    assert fid["A"] == f"3.250 ± {np.std([3.1, 3.4], ddof=1):.3f} (2)"
    assert fid["B"] == "3.200 ± 0.010 (50000)"


# ---------------------------------------------------------------------------------------------
# The real run: two variants, seeds [0, 1], the tiny preset (slow: ~5 CPU minutes)


@pytest.mark.slow
def test_two_seeds_two_variants_end_to_end(tmp_path):
    from repo_copy import copy_repo

    variants = {"eps_fixed_mse", "xprev_fixed_kl"}
    repo = copy_repo(tmp_path / "repo", "tiny", variants)
    path = repo / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "seeds": [0, 1], "extra_seeds": [1]}, sort_keys=False))
    done = subprocess.run(
        [sys.executable, "-m", "stages.repro"],
        cwd=repo, env=env(), capture_output=True, text=True, timeout=3000, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for v in variants:
        main, seed1 = (json.loads((repo / f"metrics/{k}.json").read_text()) for k in (v, f"{v}-s1"))
        assert main["fid_train"] != seed1["fid_train"]  # another network, other samples
        models = (json.loads((repo / f"models/{k}/model.json").read_text()) for k in (v, f"{v}-s1"))
        assert len({m["run_name"] for m in models}) == 2  # two runs (two MLflow runs: the report)
    table = pd.read_csv(repo / "reports/table2.csv").set_index("variant")
    for v in variants:
        fids = [json.loads((repo / f"metrics/{k}.json").read_text())["fid_train"]
                for k in (v, f"{v}-s1")]  # fmt: skip
        assert table.loc[v, "FID ours"] == pytest.approx(np.mean(fids))
        assert table.loc[v, "FID ours err"] == pytest.approx(np.std(fids, ddof=1))
        assert table.loc[v, "FID ours n"] == 2
        assert table.loc[v, "FID verdict"] == "n/a (stand-in)" or pd.isna(table.loc[v, "FID paper"])
        assert "mean ± std over 2 training seeds (0, 1)" in table.loc[v, "note"]
    md = (repo / "reports/table2.md").read_text()
    assert "n/a (stand-in)" in md and "that std is the verdict's error" in md
