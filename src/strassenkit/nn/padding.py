"""Padding rows out of STL tiles: the row mask that STLinear layers apply to their inputs.

An STL tile with ``row_tile > 1`` mixes ``row_tile`` consecutive rows (tokens) of a sample. With a
padded batch, a sentence's last tile would mix its real tokens with padding tokens, so its output
would depend on what it was batched with. The fix is the one the STL operator already uses at a
sequence end: padding rows are exactly zero at every STL input. Then a sentence gives the same
outputs alone and in any right-padded batch.

While a row mask is active (``with row_mask(attention_mask): model(...)``), every STLinear layer with
``row_tile > 1`` whose input is ``(B, L, K)`` for a mask ``(B, L)`` multiplies its input by the mask.
:func:`strassenkit.strassenify_` installs a hook on models whose ``forward`` takes ``attention_mask``
(all Hugging Face models), so users of such models never write this themselves; models without
that argument wrap their call in :func:`row_mask`.

Only right padding can be made exact (left padding shifts every tile boundary of the sentence): a
left-padded mask raises ValueError at the first layer with ``row_tile > 1`` (``row_tile=1`` layers never
mix rows and accept any mask), as does a mask whose shape does not match that layer's input.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch

__all__ = ["row_mask", "current_row_mask", "set_row_mask", "reset_row_mask", "RowMask"]


class RowMask:
    """A validated (B, L) 0/1 mask of real rows; ``apply(x)`` zeros the padding rows of x (B, L, K)."""

    def __init__(self, mask: torch.Tensor):
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor of shape (batch, seq_len), got {type(mask).__name__}")
        if mask.dim() != 2:
            raise ValueError(
                f"attention_mask must have shape (batch, seq_len) with 1 for real tokens and 0 for padding, got "
                f"shape {tuple(mask.shape)}; for other mask layouts pass a (batch, seq_len) mask with "
                f"strassenkit.nn.row_mask(mask) around the call"
            )
        if mask.dtype.is_floating_point and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold 0 (padding) and 1 (real token) only; got other values")
        real = mask != 0
        self.mask = real
        self.all_real = bool(real.all())
        self.right_padded = self.all_real or not bool((real[:, 1:] & ~real[:, :-1]).any())

    def matches(self, x: torch.Tensor) -> bool:
        """True if ``x`` is (B, L, K) for this (B, L) mask."""
        return x.dim() >= 2 and tuple(x.shape[:-1]) == tuple(self.mask.shape)

    def apply(self, x: torch.Tensor, who: str = "STLinear") -> torch.Tensor:
        """x with its padding rows zeroed (for layers whose tiles span ``row_tile > 1`` rows)."""
        if self.all_real:
            return x
        if not self.right_padded:
            raise ValueError(
                f"{who}: attention_mask has padding before real tokens (left padding). STL tiles with row_tile > 1 "
                f"keep padding out of real tiles only with right padding: tokenize with padding_side='right', or "
                f"convert with STLConfig(row_tile=1)"
            )
        if self.matches(x):
            return x * self.mask.to(device=x.device, dtype=x.dtype).unsqueeze(-1)
        raise ValueError(
            f"{who}: the active attention_mask has shape {tuple(self.mask.shape)} but this layer's input is "
            f"{tuple(x.shape)}, so its padding rows cannot be told apart and would share tiles with real rows. "
            f"Call the layer under strassenkit.nn.row_mask(<a (batch, seq_len) mask for this input>), or convert "
            f"it with STLConfig(row_tile=1)"
        )


_CURRENT: ContextVar[RowMask | None] = ContextVar("strassenkit_row_mask", default=None)


def current_row_mask() -> RowMask | None:
    """The row mask active in this context (None outside :func:`row_mask`)."""
    return _CURRENT.get()


def set_row_mask(mask: torch.Tensor | None):
    """Activate ``mask`` (None clears) until :func:`reset_row_mask` is called with the returned token."""
    return _CURRENT.set(None if mask is None else RowMask(mask))


def reset_row_mask(token) -> None:
    _CURRENT.reset(token)


@contextlib.contextmanager
def row_mask(mask: torch.Tensor | None):
    """Context manager: STLinear layers (row_tile > 1) zero the padding rows of their (B, L, K) inputs.

    ``mask`` is (batch, seq_len) with 1 (or True) for real tokens and 0 for padding, right-padded.
    ``None`` clears an outer mask.
    """
    token = set_row_mask(mask)
    try:
        yield
    finally:
        reset_row_mask(token)
