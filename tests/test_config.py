"""params.yaml: every preset loads, the paper preset is the paper, bad params fail at load time.

The paper's settings below are written out from Ho et al. 2020 (Sec. 4, Table 1 and App. B) and
from the official CIFAR10 release where the paper is silent (scripts/run_cifar.py of
hojonathanho/diffusion), not read from pipeline/config.py, so that a changed default fails here.
Bad params are tried through ``python -m stages.config``, the way a user meets them: one
``error:`` line on stderr, exit status 2, no traceback.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from repo_copy import PARAMS, ROOT, env

from pipeline.config import load_config

RAW = yaml.safe_load(PARAMS.read_text())

# Ho et al. 2020, CIFAR10: the schedule and network of Sec. 4 (details in App. B), the training of
# App. B, the evaluation of Sec. 4.1 and Table 1.
PAPER = {
    "data.dataset": "cifar10",
    "data.resolution": 32,
    "data.random_flip": True,  # App. B
    "diffusion.schedule": "linear",  # Sec. 4: beta_1 = 1e-4 to beta_T = 0.02, T = 1000
    "diffusion.beta_start": 1e-4,
    "diffusion.beta_end": 0.02,
    "diffusion.num_timesteps": 1000,
    "model.ch": 128,  # App. B: 35.7M parameters (ch, ch_mult: the official run_cifar.py)
    "model.ch_mult": (1, 2, 2, 2),
    "model.num_res_blocks": 2,
    "model.attn_resolutions": (16,),
    "model.dropout": 0.1,
    "model.norm_groups": 32,
    "model.source": "trained",
    "train.steps": 800_000,
    "train.batch_size": 128,
    "train.lr": 2e-4,
    "train.warmup": 5000,  # the official scripts/run_cifar.py
    "train.grad_clip": 1.0,  # the official scripts/run_cifar.py
    "train.ema_decay": 0.9999,
    "sample.n_samples": 50_000,  # Sec. 4.1 and App. B: FID and IS on 50,000 samples
    "sample.steps": None,  # all T steps of Algorithm 2, no respacing
    "eval.inception_weights": "default",  # the ported TF Inception (2015-12-05)
    "eval.fid_against": ("train", "test"),
    "eval.ref_images": None,  # the whole split
    "eval.is_splits": 10,
    "eval.nll_images": 10_000,  # the whole CIFAR10 test set (Table 1's NLL test)
}


def stages_config(tmp_path, params: dict, scale: str | None = None):
    """``python -m stages.config`` on ``params`` written to a file; the finished process."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "stages.config", "--params", str(path)]
    cmd += ["--scale", scale] if scale else []
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, check=False)


def with_key(scale: str, dotted: str, value) -> dict:
    """A deep copy of params.yaml with ``presets.<scale>.<section>.<key>`` set to ``value``."""
    params = yaml.safe_load(yaml.safe_dump(RAW))
    section, key = dotted.split(".")
    preset = params["presets"][scale]
    preset[section] = {**(preset.get(section) or {}), key: value}
    return params


@pytest.mark.parametrize("scale", sorted(RAW["presets"]))
def test_every_preset_loads(scale):
    cfg = load_config(PARAMS, scale)
    assert cfg.scale == scale and set(cfg.variants) == set(RAW["variants"])


def test_the_paper_preset_is_the_papers_cifar10_setting():
    flat = load_config(PARAMS, "paper").flat()
    assert {k: flat[k] for k in PAPER} == PAPER
    assert not load_config(PARAMS, "paper").stand_in_reasons()
    variants = {
        name: (v["mean_type"], v["var_type"], v["loss_type"]) for name, v in RAW["variants"].items()
    }
    assert sorted(variants.values()) == sorted(  # Table 2's six rows
        [
            ("xprev", "learned", "kl"),
            ("xprev", "fixedlarge", "kl"),
            ("xprev", "fixedlarge", "mse"),
            ("eps", "learned", "kl"),
            ("eps", "fixedlarge", "kl"),
            ("eps", "fixedlarge", "mse"),
        ]
    )


BAD = [
    # (scale, key, value, words the error must contain)
    ("tiny", "train.stepz", 10, "unknown key(s) stepz"),
    ("tiny", "train.steps", "many", "train.steps: expected an integer"),
    ("tiny", "train.lr", "fast", "train.lr: expected a number"),
    ("tiny", "model.ch_mult", 2, "model.ch_mult: expected a list"),
    ("tiny", "data.random_flip", "yes", "expected true or false"),
    ("tiny", "data.dataset", "mnist", "data.dataset: 'mnist' is not one of"),
    ("tiny", "train.batch_size", 0, "train.batch_size must be positive"),
    ("tiny", "model.dropout", 1.5, "model.dropout must be in [0, 1)"),
    ("tiny", "train.num_workers", 3, "must be divisible by train.num_workers"),
    # Between sections: each names the fix.
    ("paper", "sample.n_samples", 4, "raise sample.n_samples or lower eval.is_splits"),
    ("tiny", "eval.nll_images", 33, "exceeds the test split of synthetic (32 images)"),
    ("paper", "eval.nll_images", 10_001, "lower it to at most 10000"),
    ("tiny", "eval.ref_images", 33, "exceeds the test split of synthetic (32 images)"),
    ("tiny", "eval.rd_steps", [21], "choose steps in that range"),
]


@pytest.mark.parametrize(("scale", "key", "value", "words"), BAD, ids=[b[1] for b in BAD])
def test_bad_params_give_one_error_line_and_status_2(tmp_path, scale, key, value, words):
    done = stages_config(tmp_path, with_key(scale, key, value), scale)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert words in lines[0], lines[0]
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("fid_against", ["train", "test"], "fid_against lists 'test' but that split has 0 images"),
        ("nll_images", 10, "set data.test_fraction > 0 (LSUN has no test split)"),
    ],
)
def test_lsun_without_a_test_split_refuses_test_metrics(tmp_path, key, value, words):
    params = with_key("paper_lsun_cat", "data.test_fraction", 0.0)
    params["presets"]["paper_lsun_cat"]["eval"][key] = value
    done = stages_config(tmp_path, params, "paper_lsun_cat")
    assert done.returncode == 2 and words in done.stderr, done.stderr


def test_a_good_override_prints_the_resolved_value(tmp_path):
    done = stages_config(tmp_path, with_key("tiny", "train.lr", "3e-4"), "tiny")
    assert done.returncode == 0, done.stderr
    assert '"train.lr": 0.0003' in done.stdout
