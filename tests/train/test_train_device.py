"""Device-agnostic training: TrainConfig(device=...), batches moved to it, autocast and the process
group backend chosen for it. No GPU here: CUDA is simulated where only the choice is tested."""

import pytest
import torch
from torch import nn

from strassenkit.train import loop
from strassenkit.train.loop import TrainConfig, batch_to, resolve_device, train


def test_default_device_is_cuda_when_available_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu") == resolve_device("auto")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device(None) == torch.device("cuda", 1)  # one GPU per torchrun process
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")


def test_process_group_backend_follows_the_device():
    assert loop._pg_backend(torch.device("cuda", 0)) == "nccl"
    assert loop._pg_backend(torch.device("cpu")) == "gloo"


def test_batch_to_moves_every_tensor():
    batch = ({"input_ids": torch.zeros(2, 3, dtype=torch.long), "mask": torch.ones(2, 3)}, torch.zeros(2), None)
    moved = batch_to(batch, torch.device("meta"))
    assert moved[0]["input_ids"].is_meta and moved[0]["mask"].is_meta and moved[1].is_meta and moved[2] is None
    assert moved[0]["input_ids"].dtype == torch.long


def test_config_device_is_validated_and_old_configs_load():
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="gpu0")
    old = TrainConfig().to_dict()
    del old["device"]  # a checkpoint written before the field existed
    assert TrainConfig.from_dict(old).device is None


class _Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.seen = []

    def forward(self, x):
        self.seen.append((x.device.type, torch.is_autocast_enabled("cpu")))
        return self.lin(x)


def test_train_moves_batches_to_the_resolved_device_with_its_autocast(monkeypatch):
    asked, moved = [], []
    real_resolve, real_batch_to = loop.resolve_device, loop.batch_to

    def resolve(device=None, local_rank=None):
        asked.append(device)
        return real_resolve(device, local_rank)

    def spy(batch, device):
        moved.append(device)
        return real_batch_to(batch, device)

    monkeypatch.setattr(loop, "resolve_device", resolve)
    monkeypatch.setattr(loop, "batch_to", spy)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    model = _Recorder()
    cfg = TrainConfig(steps=3, batch_size=8, bf16=True, device="cpu", progress=False, warmup_steps=0)
    out = train(model, (x, y), cfg, eval_data=(x[:8], y[:8]))
    assert asked == ["cpu"]
    assert moved[:3] == [torch.device("cpu")] * 3 and len(moved) == 4  # 3 training batches + 1 eval batch
    train_calls = model.seen[:3]
    assert train_calls == [("cpu", True)] * 3  # autocast for the device type of the run
    assert out["step"] == 3 and "eval_loss" in out


def test_checkpoint_saves_and_restores_the_cuda_rng(monkeypatch, tmp_path):
    from strassenkit.train.checkpoint import load_checkpoint, save_checkpoint

    states = [torch.arange(8, dtype=torch.uint8), torch.arange(8, 16, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: restored.append([t.clone() for t in s]))
    model = nn.Linear(3, 2)
    ckpt = save_checkpoint(str(tmp_path), 1, model)
    load_checkpoint(ckpt, nn.Linear(3, 2))
    assert len(restored) == 1 and all(torch.equal(a, b) for a, b in zip(restored[0], states))
