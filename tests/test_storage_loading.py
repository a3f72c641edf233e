"""Files read from (shared) storage never execute code: a tampered statistics file is refused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import DataError
from pipeline.fidelity import load_numpy_dict


class Payload:
    """Unpickling this would create a file: what a tampered cache could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_statistics_are_arrays_and_a_tampered_file_is_refused(tmp_path):
    stats = {"mu": np.arange(3, dtype=np.float32), "sigma": np.eye(3)}
    torch.save(stats, tmp_path / "stat.pt")  # what torch-fidelity writes
    loaded = load_numpy_dict(tmp_path / "stat.pt")
    assert loaded["mu"].dtype == np.float32 and loaded["sigma"].dtype == np.float64
    np.testing.assert_array_equal(loaded["sigma"], stats["sigma"])
    marker = tmp_path / "code-ran"
    torch.save({"mu": stats["mu"], "sigma": Payload(marker)}, tmp_path / "tampered.pt")
    with pytest.raises(DataError, match="refused"):
        load_numpy_dict(tmp_path / "tampered.pt")
    assert not marker.exists()
    torch.save({"mu": [1.0]}, tmp_path / "list.pt")
    with pytest.raises(DataError, match="refused"):
        load_numpy_dict(tmp_path / "list.pt")
