"""Post-processing of sampled responses: truncation at the stop token (the "EOS trick").

Responses are right-aligned after a left-padded query, i.e. [B, T] with the response starting at
column 0. Conventions: docs/ppo-notes.md §1.D (N+ ``truncate_response``, ``penalty_reward_value``;
TRL ``missing_eos_penalty``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from align.rl.functional import first_true_indices


def truncate_after_stop(responses: torch.Tensor, stop_token_id: Optional[Union[int, Sequence[int]]],
                        pad_token_id: int):
    """Replace every token after the first stop token by PAD; the stop token itself is kept (D1).

    responses: [B, T] token ids. Returns
      * postprocessed responses [B, T],
      * ``sequence_lengths`` [B] (long): index of the last real token, i.e. the stop token when
        present, else T - 1 (the whole fixed-length sample is real),
      * ``has_stop`` [B] (bool): whether the row contains the stop token.
    The row's real tokens are then positions 0..sequence_lengths (see response_mask_from_lengths).
    ``stop_token_id=None`` means no stop token (nothing truncated, has_stop all False); several
    ids (``Specials.stop_ids``) mean the first of any of them ends the response.
    PAD must differ from the stop token (docs/ppo-notes.md §A1): otherwise masks built from PAD would also
    hide the stop token and the policy could never learn to stop.
    """
    t = responses.shape[1]
    if stop_token_id is None:
        is_stop = torch.zeros_like(responses, dtype=torch.bool)
    else:
        stops = [stop_token_id] if isinstance(stop_token_id, int) else list(stop_token_id)
        if pad_token_id in stops:
            raise ValueError(f"pad_token_id {pad_token_id} is a stop token {stops}: give PAD its own token")
        is_stop = torch.isin(responses, torch.tensor(stops, dtype=responses.dtype, device=responses.device))
    first_stop = first_true_indices(is_stop)                   # [B], T when absent
    has_stop = first_stop < t
    idx = torch.arange(t, device=responses.device)[None, :]    # [1, T]
    postprocessed = responses.masked_fill(idx > first_stop[:, None], pad_token_id)
    sequence_lengths = torch.where(has_stop, first_stop, torch.full_like(first_stop, t - 1))
    return postprocessed, sequence_lengths, has_stop


def response_mask_from_lengths(sequence_lengths: torch.Tensor, T: int) -> torch.Tensor:
    """Bool mask [B, T] of real response tokens: True at positions <= sequence_lengths[b]."""
    return torch.arange(T, device=sequence_lengths.device)[None, :] <= sequence_lengths[:, None]


def apply_missing_stop_penalty(scores: torch.Tensor, has_stop: torch.Tensor, penalty: float,
                               mode: str = "replace") -> torch.Tensor:
    """Penalize the scores [B] of responses without a stop token (docs/ppo-notes.md §D3).

    mode="replace" (N+ ``non_eos_penalty`` / ``penalty_reward_value``): the score becomes
    ``penalty`` (N+ and 2019 use -1).
    mode="subtract" (TRL ``missing_eos_penalty``, positive, e.g. 1.0): the score is lowered by
    the penalty's magnitude, ``score - |penalty|``; taking |.| means a penalty never raises a
    score, so the project's shared setting of -1 (written for "replace") also means "lower by 1".
    Rows with a stop token are unchanged. Returns a new [B] tensor.
    """
    if mode == "replace":
        return torch.where(has_stop, scores, torch.full_like(scores, penalty))
    if mode == "subtract":
        return torch.where(has_stop, scores, scores - abs(penalty))
    raise ValueError(f"missing-stop mode {mode!r}: choose replace or subtract")
