"""Post-processing of sampled responses: truncation at the stop token (the "EOS trick")."""
from __future__ import annotations

import torch

from align.rl.functional import first_true_indices


def truncate_after_stop(responses: torch.Tensor, stop_token_id: int, pad_token_id: int):
    """Every token after the first stop token becomes PAD (the stop token is kept).

    Returns (responses, sequence_lengths, has_stop): ``sequence_lengths`` is the index of the last
    real token per row (the stop token when present, else the last position).
    """
    is_stop = responses == stop_token_id
    first = first_true_indices(is_stop)
    t = responses.shape[1]
    has_stop = first < t
    idx = torch.arange(t, device=responses.device)[None]
    out = torch.where(idx > first[:, None], torch.full_like(responses, pad_token_id), responses)
    seq_len = torch.where(has_stop, first, torch.full_like(first, t - 1))
    return out, seq_len, has_stop


def response_mask_from_lengths(sequence_lengths: torch.Tensor, t: int) -> torch.Tensor:
    """Bool mask of real response tokens: positions <= sequence_length."""
    return torch.arange(t, device=sequence_lengths.device)[None] <= sequence_lengths[:, None]


def apply_missing_stop_penalty(scores: torch.Tensor, has_stop: torch.Tensor, penalty: float,
                               mode: str = "replace") -> torch.Tensor:
    """N+ (``replace``): a response without a stop token scores ``penalty`` (-1);
    TRL's missing_eos_penalty (``subtract``): its score is lowered by ``penalty``."""
    if mode == "replace":
        return torch.where(has_stop, scores, torch.full_like(scores, penalty))
    if mode == "subtract":
        return torch.where(has_stop, scores, scores - abs(penalty))
    raise ValueError(f"missing-stop mode {mode!r}: choose replace or subtract")
