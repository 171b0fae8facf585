"""The numeric rules every solver follows: one compute dtype, one finite check."""

from __future__ import annotations

from typing import Optional

import torch


class NonFiniteError(ValueError):
    """NaN or Inf where a finite tensor is required; the message says which tensor."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_finite(tensor: torch.Tensor, what: str, hint: Optional[str] = None) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` (and ``hint``) if ``tensor`` has NaN or Inf."""
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(f"non-finite values (NaN or Inf) in {what}" + (f"; {hint}" if hint else ""))
