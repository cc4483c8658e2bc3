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
next save.

Integrity: every checkpoint directory holds ``SHA256SUMS`` (``sha256sum -c`` format) for its three
files. :func:`latest_checkpoint` verifies the checkpoint it returns; when the newest one is damaged
(truncated, overwritten, a foreign or unreadable ``latest.json`` / ``state.json``) it falls back to the
newest intact one with a warning that names the bad file, and raises (naming every bad file) when no
intact checkpoint is left. Every load error names the file. Fault injection for tests: ``STRASSENKIT_FAULT=kill_in_checkpoint:<step>`` SIGKILLs the
process after the model file of that step was written and before the rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import warnings

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from ._faults import fault_requested

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "atomic_write_text", "read_state",
           "verify_checkpoint", "CorruptCheckpointError"]

_LATEST = "latest.json"
_SUMS = "SHA256SUMS"
_FILES = ("model.safetensors", "state.safetensors", "state.json")


class CorruptCheckpointError(RuntimeError, ValueError):
    """A checkpoint file is damaged or not a strassenkit checkpoint; the message names the file.

    A RuntimeError, and a ValueError because it is about bad input (the CLI reports it in one line).
    """


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(ckpt_dir: str) -> str | None:
    """None if ``ckpt_dir`` is an intact checkpoint, else what is wrong with which file.

    Checks that the files exist, their SHA-256 against ``SHA256SUMS`` (checkpoints written before
    checksums existed are checked for presence only), and that ``state.json`` reads as a checkpoint state.
    """
    for name in _FILES:
        if not os.path.isfile(os.path.join(ckpt_dir, name)):
            return f"{os.path.join(ckpt_dir, name)} is missing"
    sums = os.path.join(ckpt_dir, _SUMS)
    if os.path.exists(sums):
        want = {}
        try:
            with open(sums) as f:
                for line in f.read().splitlines():
                    digest, _, name = line.partition(" ")
                    want[name.strip().lstrip("*")] = digest
        except (OSError, UnicodeDecodeError) as e:
            return f"{sums} is unreadable ({e})"
        for name in _FILES:
            if want.get(name) is None:
                return f"{sums} has no checksum for {name}"
            if _sha256(os.path.join(ckpt_dir, name)) != want[name]:
                return f"{os.path.join(ckpt_dir, name)} does not match its SHA-256 in {_SUMS} (truncated or overwritten)"
    try:
        read_state(ckpt_dir)
    except CorruptCheckpointError as e:
        return str(e)
    return None


def read_state(ckpt_dir: str) -> dict:
    """The JSON state of a checkpoint (``step``, ``config``, ...); CorruptCheckpointError naming the file."""
    path = os.path.join(ckpt_dir, "state.json")
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path} is missing: {ckpt_dir} is not a complete checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path} is not valid JSON ({e}): the checkpoint is damaged") from None
    missing = [k for k in ("step", "config", "optimizer", "rng") if not isinstance(state, dict) or k not in state]
    if missing or not isinstance(state.get("step"), int):
        raise CorruptCheckpointError(f"{path} is not a strassenkit checkpoint state (missing or bad keys "
                                     f"{missing or ['step']}); it was not written by save_checkpoint")
    return state


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
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # GPU runs: dropout etc. draw from these
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return js, tensors


def _set_rng_state(js: dict, tensors: dict) -> None:
    py = js["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = js["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k[9:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


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
    with open(os.path.join(tmp, _SUMS), "w") as f:
        f.write("".join(f"{_sha256(os.path.join(tmp, n))}  {n}\n" for n in _FILES))
        f.flush()
        os.fsync(f.fileno())
    final = os.path.join(root, name)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(os.path.join(root, _LATEST), json.dumps({"step": step, "dir": name}))
    # only older checkpoints count: a newer one left behind by a fallback to an older checkpoint is not a reason
    # to delete a good one (it is replaced when the run reaches its step)
    done = sorted(n for n in os.listdir(root) if n.startswith("step_") and n < name)
    for old in done[: max(0, len(done) - (keep - 1))]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str) -> str | None:
    """Directory of the newest intact checkpoint under ``out_dir`` (None if there is none at all).

    The one ``latest.json`` names, verified (:func:`verify_checkpoint`); if it or ``latest.json`` is
    damaged, the newest older intact checkpoint, with a warning naming the bad file. Raises
    CorruptCheckpointError when checkpoints exist but none is intact.
    """
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = sorted((n for n in os.listdir(root) if n.startswith("step_") and os.path.isdir(os.path.join(root, n))),
                   reverse=True)
    path = os.path.join(root, _LATEST)
    problems: list[str] = []
    candidates = steps
    if os.path.exists(path):
        try:
            with open(path) as f:
                d = json.load(f)
            if not isinstance(d, dict) or not isinstance(d.get("dir"), str) or d["dir"] not in steps:
                raise ValueError(f"{str(d)[:80]!r} does not name a checkpoint directory of {root}")
            candidates = [d["dir"]] + [n for n in steps if n < d["dir"]]
        except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
            problems.append(f"{path} is unreadable or foreign ({e})")
    elif not steps:
        return None
    for name in candidates:
        ckpt = os.path.join(root, name)
        bad = verify_checkpoint(ckpt)
        if bad is None:
            if problems:
                warnings.warn(f"checkpoint damaged: {'; '.join(problems)}. Falling back to the newest intact checkpoint "
                              f"{ckpt}", stacklevel=2)
            return ckpt
        problems.append(bad)
    raise CorruptCheckpointError(f"no intact checkpoint under {root}: {'; '.join(problems) or 'none found'}. Delete "
                                 f"the damaged checkpoints (or the whole directory) to start over")


def load_checkpoint(
    ckpt_dir: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
    verify: bool = True,
) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and ``optimizer``).

    Returns the JSON state (``step``, ``config``, ``extra``). Missing or unexpected model keys raise.
    ``verify`` checks the files' SHA-256 first (:func:`verify_checkpoint`); every error names the file.
    """
    if verify:
        bad = verify_checkpoint(ckpt_dir)
        if bad is not None:
            raise CorruptCheckpointError(f"{bad}; not loading {ckpt_dir}")
    state = read_state(ckpt_dir)
    model_file = os.path.join(ckpt_dir, "model.safetensors")
    try:
        missing, unexpected = load_model(model, model_file, strict=False)
    except RuntimeError as e:  # tensors that do not fit the model (size mismatch)
        raise RuntimeError(f"loading {model_file} into the model failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - safetensors: SafetensorError "incomplete metadata", OSError, ...
        raise CorruptCheckpointError(f"{model_file} cannot be read ({type(e).__name__}: {e}): the checkpoint is "
                                     f"damaged") from None
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {model_file} does not fit the model: missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}; build the model with the same config (and conversion) first"
        )
    state_file = os.path.join(ckpt_dir, "state.safetensors")
    try:
        tensors = load_file(state_file)
    except Exception as e:  # noqa: BLE001 - safetensors raises several error types for damaged files
        raise CorruptCheckpointError(f"{state_file} cannot be read ({e}): the checkpoint is damaged") from None
    try:
        if optimizer is not None:
            _optim_join(optimizer, tensors, state["optimizer"])
        if restore_rng:
            _set_rng_state(state["rng"], tensors)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise RuntimeError(f"the optimizer / RNG state in {ckpt_dir} (state.json, state.safetensors) does not fit: "
                           f"{type(e).__name__}: {e}; resume with the model and options the run was started with") from None
    return state
