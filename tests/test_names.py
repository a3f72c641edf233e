"""Names in params.yaml and ``--scale`` are plain names before they reach paths or commands.

Preset and variant names become folders (``data/<scale>``, ``models/<variant>``) and arguments
of dvc.yaml's commands (``--variant ${key}``); ``stages.repro --scale`` writes params.yaml. A
name outside ``[a-z0-9_]+`` is one ``error:`` line, and params.yaml is left as it was.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from repo_copy import ROOT, env

from pipeline.config import config_from_dict
from pipeline.errors import ConfigError
from stages.repro import set_scale

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
BAD_NAMES = ["x; rm -rf ~", "$(id)", "../up", "Tiny", "a b", "a-b", "", "é"]


def copy() -> dict:
    return yaml.safe_load(yaml.safe_dump(PARAMS))


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_variant_or_preset_name_outside_plain_names_is_refused(name):
    raw = copy()
    raw["variants"][name] = raw["variants"]["eps_fixed_mse"]
    with pytest.raises(ConfigError, match=r"variants: .* is not a plain name") as bad:
        config_from_dict(raw, "tiny")
    assert "\n" not in str(bad.value)
    raw = copy()
    raw["presets"][name] = raw["presets"]["tiny"]
    with pytest.raises(ConfigError, match=r"presets: .* is not a plain name"):
        config_from_dict(raw, "tiny")
    with pytest.raises(ConfigError, match=r"scale: .* is not a plain name"):
        config_from_dict(copy(), name or "x y")


def test_every_name_of_params_yaml_is_plain():
    config_from_dict(copy(), "tiny")  # the project's own names pass
    raw = copy()
    raw["presets"]["tiny"]["model"] = {"checkpoint_variant": "eps;id"}
    with pytest.raises(ConfigError, match="checkpoint_variant"):
        config_from_dict(raw, "tiny")


def test_scale_is_checked_before_params_yaml_is_written(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    before = params.read_text()
    with pytest.raises(ConfigError, match=r"--scale: .* is not a plain name"):
        set_scale(params, "tiny\npresets: {}")
    with pytest.raises(ConfigError, match="is not a preset"):
        set_scale(params, "nope")
    assert params.read_text() == before
    set_scale(params, "tiny")
    assert yaml.safe_load(params.read_text())["scale"] == "tiny"
    done = subprocess.run(
        [sys.executable, "-m", "stages.repro", "--scale", "tiny; touch pwned"],
        cwd=tmp_path, env=env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --scale")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / ".dvc").exists()
