"""model.precision (pipeline.model.precision): explicit TF32 flags and bf16 autocast, in every
key; fp32 on the CPU changes nothing."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

from pipeline.config import config_from_dict, default_params_path
from pipeline.errors import ConfigError, DataError
from pipeline.model.precision import compute_precision, set_matmul_precision


def _cfg(**model):
    raw = yaml.safe_load(default_params_path().read_text())
    raw["presets"]["tiny"]["model"].update(model)
    return config_from_dict(raw, "tiny")


def test_precision_is_one_of_three():
    assert _cfg().model.precision == "fp32"
    assert _cfg(precision="bf16").model.precision == "bf16"
    with pytest.raises(
        ConfigError, match=r"model\.precision: 'fp16' is not one of fp32, tf32, bf16"
    ):
        _cfg(precision="fp16")


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # autocast on "cuda" without one
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_cuda_flags_are_set_explicitly_and_restored(precision):
    """The flags are process settings of torch (no GPU needed to read and write them)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    before = precision != "tf32"  # the opposite of what the context must set
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = before
        with compute_precision(precision, "cuda"):
            inside = matmul.allow_tf32, cudnn.allow_tf32
        after = matmul.allow_tf32, cudnn.allow_tf32
        assert inside == (precision == "tf32", precision == "tf32")
        assert after == (before, before)
        with compute_precision(precision, "cpu"):  # the CPU has no TF32: flags untouched
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (before, before)
            assert torch.is_autocast_cpu_enabled() is (precision == "bf16")
        set_matmul_precision(precision, "cuda")
        assert (matmul.allow_tf32, cudnn.allow_tf32) == inside
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def test_fp32_on_the_cpu_is_bit_identical_to_no_context():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 3))
    x = torch.randn(2, 3, 16, 16)
    plain = net(x)
    with compute_precision("fp32", "cpu"):
        inside = net(x)
    with compute_precision("tf32", "cpu"):
        tf32 = net(x)
    assert torch.equal(plain, inside) and torch.equal(plain, tf32)
    with compute_precision("bf16", "cpu"):
        bf16 = net(x)
    assert not torch.equal(plain, bf16)  # autocast really applies


def test_precision_is_in_the_block_keys_the_identity_and_mlflow_params():
    from pipeline.evaluation.likelihood import nll_key
    from pipeline.sampling.draw import block_key
    from pipeline.sampling.job import SamplingJob
    from pipeline.training.identity import identity_payload

    job = SamplingJob({}, {}, (0.1,), "eps", "fixedlarge", "mse", None, 0, 4)
    keys = {p: block_key(dataclasses.replace(job, precision=p), 4) for p in ("fp32", "bf16")}
    assert keys["fp32"] != keys["bf16"]
    nll = {p: nll_key(dataclasses.replace(job, precision=p), "w", "test", "d", 4) for p in keys}
    assert nll["fp32"] != nll["bf16"]
    assert _cfg(precision="tf32").flat()["model.precision"] == "tf32"
    cfg, bf16 = _cfg(), _cfg(precision="bf16")
    variant = cfg.variant("eps_fixed_mse")

    def payload(c):
        import pipeline.training.identity as identity

        original = identity.read_manifest
        identity.read_manifest = lambda d: {"splits": {}}
        try:
            return identity_payload(c, variant, "unused")
        finally:
            identity.read_manifest = original

    assert "precision" not in payload(cfg)["model"]  # fp32 runs keep their names
    assert payload(bf16)["model"]["precision"] == "bf16"


def test_a_sample_manifest_in_another_precision_is_one_data_error(tmp_path):
    from pipeline.evaluation.evaluate import load_samples
    from pipeline.sampling.draw import ModelInfo

    folder = tmp_path / "samples" / "v"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"precision": "bf16"}))
    info = ModelInfo(weights=tmp_path / "w.pt", sha256="x", meta={})
    with pytest.raises(DataError, match="drawn in precision bf16 but params say"):
        load_samples("v", info, tmp_path, "fp32")
