"""align.rl.rollout: truncation after the stop token, response masks, missing-stop penalty."""
from __future__ import annotations

import pytest
import torch

from align.rl.rollout import apply_missing_stop_penalty, response_mask_from_lengths, truncate_after_stop

STOP, PAD = 2, 0


def test_truncate_after_stop_hand_examples():
    responses = torch.tensor([
        [5, STOP, 7, 8, 9],      # stop in the middle
        [5, 6, 7, 8, STOP],      # stop at the end
        [5, 6, 7, 8, 9],         # no stop
        [STOP, 6, STOP, 8, 9],   # stop at position 0 (and again later)
        [5, STOP, PAD, PAD, PAD],  # sampler already padded after the stop
    ])
    out, seq_len, has_stop = truncate_after_stop(responses, STOP, PAD)
    assert out.tolist() == [
        [5, STOP, PAD, PAD, PAD],
        [5, 6, 7, 8, STOP],
        [5, 6, 7, 8, 9],
        [STOP, PAD, PAD, PAD, PAD],
        [5, STOP, PAD, PAD, PAD],
    ]
    assert seq_len.tolist() == [1, 4, 4, 0, 1]
    assert has_stop.tolist() == [True, True, False, True, True]
    assert seq_len.dtype == torch.long and has_stop.dtype == torch.bool
    assert responses[0, 2] == 7  # input untouched

    mask = response_mask_from_lengths(seq_len, 5)
    assert mask.dtype == torch.bool
    assert mask.int().tolist() == [
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
    ]
    # the stop token itself is a real token; everything masked out is PAD
    assert (out[~mask] == PAD).all()
    assert out[torch.arange(5), seq_len].tolist() == [STOP, STOP, 9, STOP, STOP]


def test_truncate_guards():
    r = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="PAD"):
        truncate_after_stop(r, 3, 3)
    out, seq_len, has_stop = truncate_after_stop(r, None, PAD)
    assert out.tolist() == r.tolist() and seq_len.tolist() == [2] and has_stop.tolist() == [False]


def test_missing_stop_penalty():
    scores = torch.tensor([0.5, 2.0, -0.3])
    has_stop = torch.tensor([True, False, False])
    assert apply_missing_stop_penalty(scores, has_stop, -1.0, "replace").tolist() == pytest.approx([0.5, -1.0, -1.0])
    # subtract (TRL missing_eos_penalty): lowered by |penalty| whichever sign it is written with
    for p in (1.0, -1.0):
        assert apply_missing_stop_penalty(scores, has_stop, p, "subtract").tolist() == pytest.approx([0.5, 1.0, -1.3])
    assert scores.tolist() == pytest.approx([0.5, 2.0, -0.3])  # not modified in place
    with pytest.raises(ValueError):
        apply_missing_stop_penalty(scores, has_stop, -1.0, "bogus")
