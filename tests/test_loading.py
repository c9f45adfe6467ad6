"""Checkpoint files: what write_state_dict saves, read_state_dict gives back, views included."""

from __future__ import annotations

from pathlib import Path

import torch

from workers.analysis.loading import read_state_dict, write_state_dict


def test_written_state_dict_reads_back_equal_and_the_input_is_untouched(tmp_path: Path) -> None:
    fused = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    state = {
        "qkv.weight": fused,
        "q.weight": fused[:2].t(),
        "bias": torch.zeros(3),
    }  # a non-contiguous view
    path = write_state_dict(state, tmp_path / "model.safetensors")
    loaded = read_state_dict(path)
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    assert not state["q.weight"].is_contiguous()
