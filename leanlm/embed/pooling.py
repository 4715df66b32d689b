"""sentence-transformers' pooling over the last hidden states, padding excluded."""

from __future__ import annotations

import torch


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """hidden (B, T, H), attention_mask (B, T) -> (B, H * len(modes)), the modes concatenated in order."""
    hidden = hidden.float()
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    lengths = mask.sum(dim=1).clamp(min=1.0)  # (B, 1)
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[:, 0])
        elif mode == "max":
            out.append(hidden.masked_fill(mask == 0, float("-inf")).amax(dim=1))
        elif mode == "mean":
            out.append((hidden * mask).sum(dim=1) / lengths)
        elif mode == "mean_sqrt_len_tokens":
            out.append((hidden * mask).sum(dim=1) / lengths.sqrt())
        elif mode == "lasttoken":  # right padding: the last real token sits at length - 1
            last = attention_mask.long().sum(dim=1) - 1
            out.append(hidden[torch.arange(hidden.shape[0]), last])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.cat(out, dim=-1)
