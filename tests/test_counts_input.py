"""`micromoe analyze` inputs (sim/counts.py) go through core.loads.validate_counts: bad counts fail
with one line naming the file and layer, never truncate or overflow silently."""

from __future__ import annotations

import json

import numpy as np
import pytest

from micromoe_megatron.sim.counts import FORMAT, TraceError, read_counts_file


def _write(tmp_path, layer):
    path = tmp_path / "counts.json"
    path.write_text(json.dumps({"format": FORMAT, "num_experts": 2, "layers": {"1": layer}}))
    return path


@pytest.mark.parametrize("layer, message", [
    ([[[1, 2.9], [0, 1]]], "whole numbers"),
    ([[[1, 2**64], [0, 1]]], "below 2**63"),
    ([[[2**62, 2**62], [0, 1]]], "fit in int64"),
    ([[[1, -1], [0, 1]]], "tokens[0][1]: counts must be >= 0"),
    ([[[1, 2], [0]]], "inhomogeneous"),
    ([[1, 2]], "[micro-batches, GPUs, experts]"),
], ids=["fractional", "beyond-int64", "sum-overflows", "negative", "ragged", "two-dims"])
def test_bad_counts_name_the_file(tmp_path, layer, message):
    path = _write(tmp_path, layer)
    with pytest.raises(TraceError) as error:
        read_counts_file(path)
    assert str(error.value).startswith(f"{path}: layer '1': ") and message in str(error.value)


def test_integral_floats_are_accepted_as_int64(tmp_path):
    counts = read_counts_file(_write(tmp_path, [[[1.0, 2], [0, 3]]]))
    assert counts.layers[1].dtype == np.int64 and counts.layers[1].tolist() == [[[1, 2], [0, 3]]]


def test_npz_counts_are_validated(tmp_path):
    path = tmp_path / "counts.npz"
    np.savez(path, num_experts=2, layer_1=np.array([[[1.5, 2], [0, 1]]]))
    with pytest.raises(TraceError, match="counts.npz: layer_1: .*whole numbers"):
        read_counts_file(path)
