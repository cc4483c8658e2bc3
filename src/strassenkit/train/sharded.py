"""FSDP2 training support: sharding, and sharded checkpoints through ``torch.distributed.checkpoint``.

Used by :func:`strassenkit.train.loop.train` when ``TrainConfig(strategy="fsdp")`` runs in more than
one process (torchrun): the model is sharded with ``fully_shard`` (FSDP2: every parameter a DTensor
sharded on dim 0 across the ranks), and checkpoints are written by every rank with
``torch.distributed.checkpoint`` (DCP) under ``out_dir/checkpoints_fsdp/``:

    checkpoints_fsdp/step_00000020/   DCP files (model and optimizer shards, .metadata),
                                      rng_rank{k}.pt (each rank's RNG states), state.json (step, config)
    checkpoints_fsdp/latest.json      the newest complete checkpoint

A checkpoint is written into ``.tmp-step_...`` and renamed by rank 0 only after every rank finished
(barriers before and after), then ``latest.json`` is replaced atomically: a process killed at any point
(kill -9) leaves the previous checkpoint as the latest, and the torn directory is removed by the next
save. At the end of the run the full (unsharded) model is also written to ``out_dir/model.safetensors``
by rank 0, loadable without torch.distributed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal

import numpy as np
import torch
from torch import nn

from ._faults import fault_requested
from .checkpoint import atomic_write_text

__all__ = ["fsdp_units", "shard_model", "save_sharded", "latest_sharded", "load_sharded", "save_full_model", "full_tensor"]

ROOT = "checkpoints_fsdp"


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The submodules that become FSDP units of their own (gathered one at a time), innermost first.

    The blocks of a transformer, as FSDP's usual recipe wraps them: a Hugging Face model's
    ``_no_split_modules`` classes (``BertLayer``, ``LlamaDecoderLayer``, ...) when it names any that it has, else
    every module held in an ``nn.ModuleList`` (the ``blocks``/``layers`` of nanoGPT-style models and of
    strassenkit's ViT). Modules without parameters are left out; the root is always a unit of its own. An
    empty list (e.g. a plain MLP) leaves the whole model as one unit.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    mods = list(model.modules())
    units = [m for m in mods if m is not model and type(m).__name__ in names]
    if not units:
        units = [c for m in mods if isinstance(m, nn.ModuleList) for c in m]
    units = [m for m in units if any(True for _ in m.parameters())]
    order = {id(m): i for i, m in enumerate(mods)}
    return sorted(dict.fromkeys(units), key=lambda m: -order[id(m)])  # descendants before their ancestors


def shard_model(model: nn.Module) -> nn.Module:
    """Shard ``model`` in place with FSDP2's ``fully_shard``: each of :func:`fsdp_units` (the transformer blocks)
    is a unit of its own, then the root (every parameter sharded on dim 0). During forward and backward only
    one block's parameters are gathered at a time, so the full model never has to fit on one device."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # pragma: no cover - torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    for unit in fsdp_units(model):
        fully_shard(unit)
    fully_shard(model)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank must call it); other tensors unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def _state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def save_sharded(out_dir: str, step: int, model: nn.Module, optimizer, config: dict, extra: dict, rank: int,
                 keep: int = 2) -> str:
    """Write sharded checkpoint ``step`` (collective: every rank calls it); returns its directory."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    root = os.path.join(out_dir, ROOT)
    name = f"step_{step:08d}"
    tmp, final = os.path.join(root, f".tmp-{name}"), os.path.join(root, name)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for n in os.listdir(root):  # torn checkpoints of a killed run
            if n.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, n), ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dcp.save(_state(model, optimizer), checkpoint_id=tmp)
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if fault_requested("kill_in_checkpoint", step):
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # every rank's shards and RNG are on disk
    if rank == 0:
        state = {"version": 1, "format": "dcp", "step": step, "world_size": dist.get_world_size(),
                 "config": config, "extra": extra, "optimizer": "dcp", "rng": "rng_rank{rank}.pt"}
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(os.path.join(root, "latest.json"), json.dumps({"step": step, "dir": name}))
        older = sorted(n for n in os.listdir(root) if n.startswith("step_") and n < name)
        for old in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()
    return final


def latest_sharded(out_dir: str) -> str | None:
    """The newest complete sharded checkpoint under ``out_dir`` (None if there is none)."""
    path = os.path.join(out_dir, ROOT, "latest.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        d = json.load(f)
    ckpt = os.path.join(out_dir, ROOT, d["dir"])
    if not os.path.exists(os.path.join(ckpt, "state.json")):
        raise RuntimeError(f"{path} names {ckpt}, which is incomplete (no state.json); delete it to start over")
    return ckpt


def load_sharded(ckpt: str, model: nn.Module, optimizer, rank: int) -> dict:
    """Load a sharded checkpoint into the (already sharded) ``model`` and ``optimizer``, and this rank's RNG."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    with open(os.path.join(ckpt, "state.json")) as f:
        state = json.load(f)
    if state.get("world_size") != dist.get_world_size():
        raise RuntimeError(f"{ckpt} was written by {state.get('world_size')} processes; resume it with as many "
                           f"(this run has {dist.get_world_size()}) to continue bit-identically")
    sd = _state(model, optimizer)
    dcp.load(sd, checkpoint_id=ckpt)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    _set_rng_state(torch.load(os.path.join(ckpt, f"rng_rank{rank}.pt"), weights_only=False))
    return state


def save_full_model(path: str, model: nn.Module, rank: int) -> None:
    """Gather the full model state (collective) and write it with safetensors on rank 0."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        tmp = path + ".tmp"
        save_file({k: v.detach().contiguous() for k, v in sd.items()}, tmp)
        os.replace(tmp, path)
