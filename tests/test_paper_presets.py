"""The paper presets follow the paper and the official run (issue 17): which variants an LSUN
scale trains, its FID protocol, flips, Table 1's train NLL, the official training semantics and
checkpoint selection; and the new keys' validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from repo_copy import PARAMS

from pipeline.config import config_from_dict, load_config
from pipeline.errors import ConfigError
from pipeline.training.published import skip_reason

ROOT = Path(__file__).resolve().parents[1]
LSUN = ("paper_lsun_church", "paper_lsun_bedroom", "paper_lsun_cat")


@pytest.mark.parametrize("scale", LSUN)
def test_lsun_presets_train_l_simple_only(scale):
    cfg = load_config(PARAMS, scale)
    run = [v for v in cfg.variants if skip_reason(cfg, v) is None]
    assert run == ["eps_fixed_mse"]
    assert "trains eps_fixed_mse only" in skip_reason(cfg, "eps_fixed_kl")


@pytest.mark.parametrize("scale", [*LSUN, "published_lsun_church", "published_lsun_cat"])
def test_lsun_fid_protocol_is_stylegan2s_fid50k_on_every_record(scale):
    cfg = load_config(PARAMS, scale)
    assert cfg.eval.ref_images == 50_000 and cfg.eval.fid_against == ("train",)
    assert cfg.data.test_fraction == 0.0  # the official run trained on all records
    assert cfg.sample.var_type == "fixedsmall"


def test_flips_follow_the_official_script_by_default_or_the_papers_text():
    """data.flip_source: official (run_lsun.py: Cat unflipped) by default; paper (App. B:
    Bedroom unflipped) on request; random_flip set explicitly wins over both."""
    flips = {s: load_config(PARAMS, s).data.random_flip for s in (*LSUN, "paper")}
    assert flips == {
        "paper_lsun_church": True,
        "paper_lsun_bedroom": True,
        "paper_lsun_cat": False,
        "paper": True,
    }
    assert not load_config(PARAMS, "published_lsun_cat").data.random_flip
    raw = yaml.safe_load(PARAMS.read_text())
    for scale in LSUN:
        raw["presets"][scale]["data"]["flip_source"] = "paper"
    by_paper = {s: config_from_dict(raw, s).data.random_flip for s in LSUN}
    assert by_paper == {
        "paper_lsun_church": True,
        "paper_lsun_bedroom": False,
        "paper_lsun_cat": True,
    }
    raw["presets"]["paper_lsun_cat"]["data"]["random_flip"] = False
    assert not config_from_dict(raw, "paper_lsun_cat").data.random_flip
    raw["presets"]["paper_lsun_cat"]["data"]["flip_source"] = "text"
    with pytest.raises(ConfigError, match="flip_source: 'text' is not one of official, paper"):
        config_from_dict(raw, "paper_lsun_cat")


def test_paper_preset_fills_every_table1_cell_and_selects_the_best_fid():
    cfg = load_config(PARAMS, "paper")
    assert cfg.eval.nll_train_images > 0 and cfg.eval.nll_images == 10_000
    assert cfg.train.clip_replicas == 8 and cfg.train.kl_units == "bits"
    assert cfg.train.select == "best_fid" and cfg.train.eval_every > 0
    for scale in LSUN:
        assert load_config(PARAMS, scale).train.select == "best_fid"


def _with(scale: str, **train) -> dict:
    raw = yaml.safe_load(PARAMS.read_text())
    raw["presets"][scale]["train"].update(train)
    return raw


@pytest.mark.parametrize(
    "train,message",
    [
        ({"clip_replicas": 3}, "clip_replicas (3) must divide train.batch_size (8)"),
        ({"clip_replicas": 4, "num_workers": 8, "batch_size": 8}, "multiple of train.num_workers"),
        ({"clip_replicas": 4, "grad_clip": 0.0}, "clips each replica's gradient: it needs"),
        ({"clip_replicas": 4, "grad_clip": -1.0}, "(got grad_clip -1.0), the clip sets"),
        ({"clip_replicas": 4, "grad_clip": 1e12}, "(got grad_clip 1000000000000.0)"),
        ({"kl_units": "nepers"}, "kl_units: 'nepers' is not one of bits, nats"),
        ({"select": "best_fid"}, "best_fid needs evaluation during training"),
        ({"eval_every": 4}, "must both be positive"),
        ({"variants": ["eps_nope"]}, "train.variants: 'eps_nope' is not one of"),
    ],
)
def test_new_train_keys_are_checked(train, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(_with("tiny", **train), "tiny")


def test_sample_var_type_is_checked():
    raw = yaml.safe_load(PARAMS.read_text())
    raw["presets"]["tiny"]["sample"]["var_type"] = "learned"
    with pytest.raises(ConfigError, match=r"sample\.var_type: 'learned' is not one of"):
        config_from_dict(raw, "tiny")


def test_figures_use_training_images_without_a_test_split(tmp_path):
    """LSUN at test_fraction 0 has no test split: Fig. 7 and 8 take the first training images."""
    import json

    import numpy as np
    from train_project import make_project

    from pipeline.data import open_split
    from pipeline.evaluation.evaluate import figure_spec

    cfg = make_project(tmp_path)
    manifest = tmp_path / "data" / cfg.scale / "manifest.json"
    meta = json.loads(manifest.read_text())
    del meta["splits"]["test"]
    manifest.write_text(json.dumps(meta))
    spec = figure_spec(cfg, tmp_path)
    train = open_split(tmp_path / "data" / cfg.scale, "train")
    assert np.array_equal(spec.recon_images, train[: cfg.eval.recon_images])
    assert np.array_equal(spec.interp_sources[0], train[0])
