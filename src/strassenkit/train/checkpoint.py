"""Atomic checkpoints: safetensors for tensors, JSON for everything else.

Layout under ``<out>/checkpoints/``::

    step_00000100/model.safetensors   model parameters and persistent buffers
    step_00000100/state.safetensors   optimizer tensors (exp_avg, ...) and torch's RNG state
    step_00000100/state.json          config, step, optimizer param_groups, Python/NumPy RNG, metrics
    latest.json                       {"step": 100, "dir": "step_00000100"}

Atomicity: a checkpoint is written into a temporary directory (``.tmp-step_...``), every file is
fsync'ed, the directory is renamed into place (``os.replace``, atomic on POSIX), and only then is
``latest.json`` replaced (temp file + ``os.replace``). A crash at any point leaves the previous
``latest.json`` pointing at a complete checkpoint; stale ``.tmp-*`` directories are removed by the
next save. Fault injection for tests: ``STRASSENKIT_FAULT=kill_in_checkpoint:<step>`` SIGKILLs the
process after the model file of that step was written and before the rename.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from ._faults import fault_requested

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "atomic_write_text"]

_LATEST = "latest.json"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _rng_state() -> tuple[dict, dict]:
    py = random.getstate()
    npst = np.random.get_state()
    js = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
    }
    return js, {"rng.torch": torch.get_rng_state()}


def _set_rng_state(js: dict, tensors: dict) -> None:
    py = js["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = js["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["rng.torch"])


def _optim_split(optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict]:
    if optimizer is None:
        return {}, {}
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optim_join(optimizer, tensors: dict, js: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if not key.startswith("optim."):
            continue
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for idx, d in js.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(d)
    optimizer.load_state_dict({"state": state, "param_groups": js["param_groups"]})


def save_checkpoint(
    out_dir: str,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    config: dict | None = None,
    extra: dict | None = None,
    keep: int = 2,
) -> str:
    """Write checkpoint ``step`` atomically under ``out_dir/checkpoints``; returns its directory.

    ``keep`` most recent complete checkpoints are kept (older ones are deleted after the new one is
    in place).
    """
    root = os.path.join(out_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):  # leftovers of a crashed save
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    name = f"step_{step:08d}"
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    os.makedirs(tmp)
    save_model(model, os.path.join(tmp, "model.safetensors"))
    _fsync_file(os.path.join(tmp, "model.safetensors"))
    if fault_requested("kill_in_checkpoint", step):
        os.kill(os.getpid(), signal.SIGKILL)
    opt_t, opt_js = _optim_split(optimizer)
    rng_js, rng_t = _rng_state()
    save_file({**opt_t, **rng_t}, os.path.join(tmp, "state.safetensors"))
    _fsync_file(os.path.join(tmp, "state.safetensors"))
    state = {"version": 1, "step": step, "config": config or {}, "optimizer": opt_js, "rng": rng_js,
             "extra": extra or {}}
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    final = os.path.join(root, name)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(os.path.join(root, _LATEST), json.dumps({"step": step, "dir": name}))
    done = sorted(n for n in os.listdir(root) if n.startswith("step_") and n != name)
    for old in done[: max(0, len(done) - (keep - 1))]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str) -> str | None:
    """Directory of the last complete checkpoint under ``out_dir`` (None if there is none)."""
    root = os.path.join(out_dir, "checkpoints")
    path = os.path.join(root, _LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        d = json.load(f)
    ckpt = os.path.join(root, d["dir"])
    if not os.path.exists(os.path.join(ckpt, "state.json")):
        raise FileNotFoundError(f"{path} points at {ckpt}, which is incomplete or missing")
    return ckpt


def load_checkpoint(
    ckpt_dir: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and ``optimizer``).

    Returns the JSON state (``step``, ``config``, ``extra``). Missing or unexpected model keys raise.
    """
    with open(os.path.join(ckpt_dir, "state.json")) as f:
        state = json.load(f)
    missing, unexpected = load_model(model, os.path.join(ckpt_dir, "model.safetensors"), strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {ckpt_dir} does not fit the model: missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}; build the model with the same config (and conversion) first"
        )
    tensors = load_file(os.path.join(ckpt_dir, "state.safetensors"))
    if optimizer is not None:
        _optim_join(optimizer, tensors, state["optimizer"])
    if restore_rng:
        _set_rng_state(state["rng"], tensors)
    return state
