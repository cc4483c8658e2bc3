import json
import math
import os

import pytest
import torch
from torch import nn

from strassenkit import STLConfig, strassenify_
from strassenkit._models.synthetic import BigramLM, TokenMLP, synthetic_data, synthetic_lm_data
from strassenkit.train import (
    NonFiniteLossError,
    TrainConfig,
    batch_indices,
    latest_checkpoint,
    load_checkpoint,
    lr_factor,
    param_groups,
    save_checkpoint,
    train,
)


def _cfg(**kw):
    base = dict(steps=40, batch_size=32, lr=3e-3, warmup_steps=4, progress=False, log_every=5)
    base.update(kw)
    return TrainConfig(**base)


def _mlp(seed=0, stl=False):
    torch.manual_seed(seed)
    m = TokenMLP()
    if stl:
        strassenify_(m, STLConfig(keep_dense_weight=False))
    return m


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:9], f[1:10]))  # increasing warmup
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # decreasing cosine
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_factor(100, cfg) == pytest.approx(0.1)


def test_param_groups_lrs_and_decay():
    m = _mlp(stl=True)
    cfg = TrainConfig(lr=1e-2, lr_groups={"enc_x": 0.1, "re:.*\\.dec": 0.5})
    groups = {g["name"]: g for g in param_groups(m, cfg)}
    assert set(groups) == {"enc_x", "re:.*\\.dec", "default", "default/no_decay"}
    assert groups["enc_x"]["lr"] == pytest.approx(1e-3) and groups["re:.*\\.dec"]["lr"] == pytest.approx(5e-3)
    assert groups["default/no_decay"]["weight_decay"] == 0.0  # biases
    n_enc = sum(1 for n, _ in m.named_parameters() if n.endswith("enc_x"))
    assert len(groups["enc_x"]["params"]) == n_enc == 2
    with pytest.raises(ValueError, match="match no trainable parameter"):
        param_groups(m, TrainConfig(lr_groups={"a_hat": 2.0}))

def test_lr_multipliers_are_applied_by_the_loop(tmp_path):
    m = _mlp(stl=True)
    cfg = _cfg(steps=4, warmup_steps=0, lr=1e-2, lr_groups={"enc_x": 0.1}, ckpt_every=2)
    (x, y), _ = synthetic_data(256, 8)
    enc0 = m.fc1.enc_x.detach().clone()
    train(m, (x, y), cfg, out_dir=str(tmp_path))
    state = json.load(open(tmp_path / "checkpoints" / "step_00000002" / "state.json"))
    lrs = {g["name"]: g["lr"] for g in state["optimizer"]["param_groups"]}
    f = lr_factor(1, cfg)  # the lr set for the last step taken before the checkpoint
    assert lrs["enc_x"] == pytest.approx(1e-3 * f) and lrs["default"] == pytest.approx(1e-2 * f)
    assert not torch.equal(m.fc1.enc_x, enc0)  # the encoder group trains


def test_batches_are_a_pure_function_of_step():
    a = batch_indices(7, 100, 32, seed=3)
    assert torch.equal(a, batch_indices(7, 100, 32, seed=3))
    epoch = torch.cat([batch_indices(s, 100, 32, seed=3) for s in range(3)])
    assert len(set(epoch.tolist())) == 96  # no repeats inside an epoch
    assert not torch.equal(batch_indices(3, 100, 32, 3), batch_indices(0, 100, 32, 3))  # next epoch reshuffled
    with pytest.raises(ValueError, match="larger than the dataset"):
        batch_indices(0, 10, 32, 0)


@pytest.mark.parametrize("stl", [False, True])
def test_training_reduces_loss_and_writes_metrics(tmp_path, stl):
    (x, y), ev = synthetic_data(1024, 256)
    m = _mlp(stl=stl)
    cfg = _cfg(steps=60, lr=1e-2, eval_every=30, ckpt_every=30)
    out = train(m, (x, y), cfg, out_dir=str(tmp_path), eval_data=ev)
    lines = [json.loads(s) for s in open(tmp_path / "metrics.jsonl")]
    assert lines[0]["step"] == 5 and lines[-1]["final"] is True
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.05
    assert out["eval_acc"] > 0.6  # 4 classes, none above 30 % of the samples
    assert latest_checkpoint(str(tmp_path)).endswith("step_00000060")


def test_lm_task_bf16_and_kd(tmp_path):
    (x, y), ev = synthetic_lm_data(512, 64)
    torch.manual_seed(0)
    m = BigramLM()
    strassenify_(m, STLConfig())  # BigramLM is causal -> row_tile 1
    assert m.fc.row_tile == 1
    out = train(m, (x, y), _cfg(task="lm", bf16=True, steps=30), eval_data=ev)
    assert math.isfinite(out["loss"]) and out["eval_ppl"] < 16  # better than uniform over 16 symbols
    # distillation with lam=0 is plain cross entropy: same parameters as without a teacher
    a, b = _mlp(1), _mlp(1)
    teacher = _mlp(2)
    (x, y), _ = synthetic_data(256, 8)
    train(a, (x, y), _cfg(steps=5))
    train(b, (x, y), _cfg(steps=5, kd_lambda=0.0), teacher=teacher)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
    # lam > 0 and hidden-state matching change the result; the teacher is never updated
    c = _mlp(1)
    t0 = [p.clone() for p in teacher.parameters()]
    train(c, (x, y), _cfg(steps=5, kd_lambda=0.7, hidden_kd={"fc2": "fc2"}, hidden_kd_weight=1.0), teacher=teacher)
    assert not torch.allclose(c.fc1.weight, a.fc1.weight)
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), t0))


class _Explodes(nn.Module):
    """A model whose loss becomes NaN from the ``bad``-th forward pass on."""

    def __init__(self, bad):
        super().__init__()
        self.inner = TokenMLP()
        self.calls, self.bad = 0, bad

    def forward(self, x):
        self.calls += 1
        out = self.inner(x)
        return out * float("nan") if self.calls >= self.bad else out


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    m = _Explodes(bad=13)
    (x, y), _ = synthetic_data(256, 8)
    with pytest.raises(NonFiniteLossError, match=r"step 12.*step_00000010"):
        train(m, (x, y), _cfg(steps=30, ckpt_every=5), out_dir=str(tmp_path))
    ck = latest_checkpoint(str(tmp_path))
    assert ck.endswith("step_00000010")
    fresh = _Explodes(bad=10**9)
    state = load_checkpoint(ck, fresh)
    assert state["step"] == 10
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_checkpoint_roundtrip_model_optimizer_rng(tmp_path):
    m = _mlp(stl=True)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(2, 8, 16)).sum().backward()
    opt.step()
    torch.manual_seed(123)
    path = save_checkpoint(str(tmp_path), 7, m, opt, config={"a": 1})
    expect_rand = torch.rand(3)
    m2 = _mlp(seed=5, stl=True)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    state = load_checkpoint(path, m2, opt2)
    assert state["step"] == 7 and state["config"] == {"a": 1}
    for (n, p), q in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(p, q), n
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    assert torch.equal(torch.rand(3), expect_rand)  # RNG restored to the saved state
    with pytest.raises(RuntimeError, match="does not fit the model"):
        load_checkpoint(path, _mlp())  # dense model, STL checkpoint
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest.json", "step_00000007"]


def test_resume_with_another_config_is_refused_and_leaves_the_model_alone(tmp_path):
    """train(resume=True) must not silently continue a checkpoint written by another run."""
    (x, y), _ = synthetic_data(512, 64)
    train(_mlp(), (x, y), _cfg(steps=20, ckpt_every=10), out_dir=str(tmp_path), extra_config={"model": "mlp"})
    for bad, word in ((dict(lr=1e-2), "TrainConfig.lr"), (dict(seed=3), "TrainConfig.seed"),
                      (dict(batch_size=16), "TrainConfig.batch_size"), (dict(steps=10), "TrainConfig.steps")):
        m = _mlp(seed=5)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(ValueError, match=word) as e:
            train(m, (x, y), _cfg(ckpt_every=10, **{"steps": 20, **bad}), out_dir=str(tmp_path),
                  resume=True, extra_config={"model": "mlp"})
        assert "new out_dir" in str(e.value)
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # nothing was loaded
    with pytest.raises(ValueError, match=r"extra_config\['model'\]"):
        train(_mlp(), (x, y), _cfg(steps=20, ckpt_every=10), out_dir=str(tmp_path), resume=True,
              extra_config={"model": "other"})
    # options that do not change the parameters may differ, and steps may grow past the checkpoint
    out = train(_mlp(), (x, y), _cfg(steps=30, ckpt_every=10, log_every=7, threads=2), out_dir=str(tmp_path),
                resume=True, extra_config={"model": "mlp"})
    assert out["step"] == 30
