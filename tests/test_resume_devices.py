"""CUDA RNG states are saved per device and restored for the devices a process has."""

from __future__ import annotations

import torch

from pipeline.training.checkpoint import capture_rng, restore_cuda_rng, restore_rng


def test_a_checkpoint_of_more_devices_restores_those_present():
    """Eight saved device states (a node of 8 GPUs) restore on 0 or 1 GPU without an error."""
    state = torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state()
    saved = {"devices": [state.clone() for _ in range(8)]}
    assert restore_cuda_rng(saved) == min(8, torch.cuda.device_count())
    assert restore_cuda_rng(saved["devices"][:0]) == 0  # none saved (a CPU run): nothing to set
    rng = {**capture_rng(), "cuda": saved}
    restore_rng(rng)  # a CPU process ignores CUDA states; a GPU process takes device 0's
    if torch.cuda.is_available():
        torch.cuda.init()
        expected = torch.rand(4, device="cuda")
        restore_rng(rng)
        assert torch.equal(torch.rand(4, device="cuda"), expected)
