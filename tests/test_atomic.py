"""Atomic writes: nothing half-written is ever visible; results get normal permissions."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from pipeline.atomic import atomic_dir, atomic_path, write_json
from pipeline.model.unet import UNet
from pipeline.model.weights import save_weights


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_failed_folder_keeps_the_old_one(tmp_path):
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
        raise RuntimeError("interrupted")
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_results_get_umask_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_weights_files_are_byte_reproducible(tmp_path):
    torch.manual_seed(0)
    model = UNet(resolution=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
    save_weights(tmp_path / "a.pt", model, {"step": 1})
    save_weights(tmp_path / "b.pt", model, {"step": 1})
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
