"""Atomic writes: nothing half-written is ever visible; results get normal permissions."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.atomic import atomic_dir, atomic_path, recover_dir, write_json
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


def test_a_crash_between_the_two_renames_is_recovered(tmp_path):
    """atomic_dir replaces a folder with two renames; a process killed between them leaves
    no target, only its ``.<name>.old.<pid>`` copy: the next atomic_dir renames it back first,
    and a reader finds the old folder again (and never a missing one once it has run)."""
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("old")
    crashed = subprocess.Popen([sys.executable, "-c", "pass"])
    crashed.wait()  # a process that is gone, as after a SIGKILL between the renames
    os.replace(target, tmp_path / f".d.old.{crashed.pid}")  # its first rename, then nothing
    assert not target.exists()
    assert recover_dir(target)
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    os.replace(target, tmp_path / f".d.old.{crashed.pid}")  # again, now recovered by atomic_dir
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        assert (target / "a").read_text() == "old"  # recovered before the new content starts
        raise RuntimeError("interrupted")
    assert (target / "a").read_text() == "old"
    live = tmp_path / f".d.old.{os.getppid()}"  # a live process's copy: mid-replace, left alone
    live.mkdir()
    assert not recover_dir(target) and live.is_dir()


def test_outputs_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    """The file (or every file of a folder, and the folder) is fsynced before it is renamed
    into place, and the parent folder after the rename."""
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def record_replace(src, dst):
        events.append(("replace", str(src)))
        return replace(src, dst)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    write_json(tmp_path / "m.json", {"a": 1})
    (kind, synced), (kind2, renamed), (kind3, parent) = events
    assert (kind, kind2, kind3) == ("fsync", "replace", "fsync")
    assert synced == renamed and parent == str(tmp_path)
    events.clear()
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("x")
    names = [(k, Path(p).name) for k, p in events]
    assert names.index(("fsync", "x")) < names.index(("fsync", tmp.name))
    assert names.index(("fsync", tmp.name)) < names.index(("replace", tmp.name))
    assert names[-1] == ("fsync", tmp_path.name)
