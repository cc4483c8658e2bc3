"""The training loop: classification and language modeling, resumable, single- or multi-process.

``train(model, data, config, out_dir, eval_data=None, teacher=None, resume=False)``

- AdamW with per-parameter-group learning rates (``TrainConfig.lr_groups``), linear warmup then cosine
  decay to ``min_lr_ratio * lr``, gradient clipping, optional bf16 autocast (on the training device).
- Device: ``TrainConfig.device`` (default None: CUDA if available, else CPU; under torchrun each
  process takes ``cuda:LOCAL_RANK``). The model (and a teacher) are moved there in place, every batch
  is moved there after it is drawn (the data may stay on the CPU), autocast runs for that device type.
- Tasks: "classification" (logits (B, C), labels (B,)) and "lm" (logits (B, L, V), next tokens (B, L);
  label -100 is ignored). The loss is cross entropy, or with a ``teacher`` the distillation loss
  ``(1 - kd_lambda) CE + kd_lambda T^2 KL-style soft term`` of :mod:`strassenkit.train.distill`, plus
  ``hidden_kd_weight`` x MSE between hidden states of module pairs (``hidden_kd``).
- Batches are a pure function of (seed, step): step s of epoch e = s // (n // B) takes the samples
  ``perm_e[(s mod n//B) * B : ... + B]`` with ``perm_e`` a permutation seeded by (seed, e). So a
  resumed run sees exactly the batches the uninterrupted run sees, and under DDP rank k of W takes
  the k-th contiguous slice of the same global batch (same gradient as one process, up to rounding).
- Checkpoints (:mod:`strassenkit.train.checkpoint`) every ``ckpt_every`` steps and at the end; with
  ``resume=True`` the loop restarts from the last complete one (model, optimizer, RNG, step) and
  drops metric lines written after it.
- A non-finite loss or gradient norm raises :class:`NonFiniteLossError` before the optimizer step;
  the last good checkpoint stays as it is.
- Threads: ``TrainConfig.threads`` (default 1) is applied with ``torch.set_num_threads`` in every
  process for the duration of the call (the previous setting is restored afterwards). On a 2-core machine one thread per process is several times faster for small models
  than PyTorch's default (thread synchronization dominates small ops); run DDP with one process per
  core. Set threads=0 to keep PyTorch's default (large matmuls can profit from more threads).
- Multi-process: start with ``torchrun --nproc_per_node=2 ...``; the loop sees WORLD_SIZE > 1, joins a
  process group (NCCL on CUDA, gloo on CPU) and wraps the model in DistributedDataParallel
  (``strategy="ddp"``, the default; only rank 0 writes files) or shards it with FSDP2's ``fully_shard``
  (``strategy="fsdp"``): then every rank writes its shards of sharded checkpoints through
  ``torch.distributed.checkpoint`` under ``out_dir/checkpoints_fsdp`` (resume with the same number of
  processes: bit-identical), and the full model goes to ``out_dir/model.safetensors`` at the end
  (see :mod:`strassenkit.train.sharded`). One process ignores the strategy.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._utils import check_int
from ._faults import fault_requested
from .checkpoint import latest_checkpoint, load_checkpoint, read_state, save_checkpoint

__all__ = ["TrainConfig", "NonFiniteLossError", "train", "lr_factor", "param_groups", "batch_indices", "evaluate",
           "resolve_device", "batch_to"]


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/inf; the run stopped before applying that step."""


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train` (serialized into every checkpoint).

    lr_groups: {pattern: lr multiplier}; a parameter whose name matches a pattern (exact name, a
        suffix on a "." boundary such as "enc_x", or "re:<regex>" for re.fullmatch; first match wins)
        gets lr * multiplier. E.g. {"enc_x": 0.1, "dec": 0.1} trains STL encoders/decoders 10x slower
        than w_hat; {"a_hat": 1.0, "w_b": 0.3, "w_c": 0.3} for SPN layers.
    no_decay: parameters with fewer than 2 dims (biases, norms) get no weight decay when True.
    """

    steps: int = 100
    batch_size: int = 64  # global batch (split across DDP ranks)
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    bf16: bool = False
    seed: int = 0
    task: str = "classification"
    lr_groups: dict = field(default_factory=dict)
    no_decay: bool = True
    kd_lambda: float = 0.5
    kd_temperature: float = 2.0
    hidden_kd: dict = field(default_factory=dict)  # {student module name: teacher module name}
    hidden_kd_weight: float = 0.0
    log_every: int = 10
    eval_every: int = 0
    eval_batch_size: int = 256
    ckpt_every: int = 0
    keep_checkpoints: int = 2
    threads: int = 1
    progress: bool = True
    version: int = 1
    device: str | None = None  # None / "auto": CUDA if available, else CPU; or "cpu", "cuda", "cuda:1", ...
    strategy: str = "ddp"  # multi-process: "ddp" (DistributedDataParallel) or "fsdp" (FSDP2 fully_shard)

    def __post_init__(self):
        for name, lo in (("steps", 0), ("batch_size", 1)):
            check_int(f"TrainConfig.{name}", getattr(self, name), lo)
        if self.task not in ("classification", "lm"):
            raise ValueError(f"TrainConfig.task must be 'classification' or 'lm', got {self.task!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("TrainConfig.warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"TrainConfig.strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")
        if self.device not in (None, "auto"):
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"TrainConfig.device must be None, 'auto' or a torch device string, got {self.device!r}") from None
        self.betas = tuple(self.betas)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig has no field(s) {unknown}; fields are {sorted(known)}")
        return cls(**d)


# ------------------------------------------------------------------ pieces
def resolve_device(device: str | torch.device | None = None, local_rank: int | None = None) -> torch.device:
    """The training device: None / "auto" is CUDA when available, else the CPU; a bare "cuda" becomes
    ``cuda:LOCAL_RANK`` (one GPU per torchrun process)."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"TrainConfig(device={str(device)!r}): no CUDA device is available; use device='cpu'")
        if dev.index is None:
            lr = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
            dev = torch.device("cuda", lr % torch.cuda.device_count())
    return dev


def _pg_backend(device: torch.device) -> str:
    """The process-group backend for a training device: NCCL for CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def batch_to(batch, device: torch.device):
    """A batch (a tensor, a dict / tuple / list of them, or None) with every tensor on ``device``."""
    return _to(batch, device)


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at ``step`` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    prog = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))


def _pmatch(pat: str, name: str) -> bool:
    if pat.startswith("re:"):
        return re.fullmatch(pat[3:], name) is not None
    return name == pat or name.endswith("." + pat)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW parameter groups: one per (lr multiplier, decay) combination, each with a ``name``."""
    for pat in cfg.lr_groups:
        if pat.startswith("re:"):
            re.compile(pat[3:])
    groups: dict[tuple, dict] = {}
    matched = {p: False for p in cfg.lr_groups}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult, label = 1.0, "default"
        for pat, m in cfg.lr_groups.items():
            if _pmatch(pat, name):
                mult, label, matched[pat] = float(m), pat, True
                break
        decay = not (cfg.no_decay and p.dim() < 2)
        key = (label, decay)
        if key not in groups:
            groups[key] = {"params": [], "name": f"{label}{'' if decay else '/no_decay'}", "lr_mult": mult,
                           "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.lr * mult}
        groups[key]["params"].append(p)
    unused = [p for p, hit in matched.items() if not hit]
    if unused:
        raise ValueError(f"lr_groups patterns {unused} match no trainable parameter; names look like "
                         f"{[n for n, _ in model.named_parameters()][:6]}")
    return list(groups.values())


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of the global batch of ``step`` (a pure function of its arguments)."""
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} is larger than the dataset ({n} samples)")
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)[k * batch_size:(k + 1) * batch_size]


def _task_loss(logits, y, task):
    if task == "lm":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
    return F.cross_entropy(logits, y)


class _Samples:
    """Training or evaluation data: ``(x, y)`` tensors, or a dict of model keyword inputs (samples on dim 0)."""

    def __init__(self, data, what: str = "data"):
        self.keywords = isinstance(data, dict) or (hasattr(data, "keys") and hasattr(data, "__getitem__"))
        if self.keywords:
            data = dict(data)
            bad = [k for k, v in data.items() if not isinstance(v, torch.Tensor)]
            if not data or bad:
                raise TypeError(f"{what}: a dict of model inputs must map names to tensors with the samples on dim 0 "
                                f"(e.g. input_ids, attention_mask); {'it is empty' if not data else f'not tensors: {bad}'}")
            lens = {k: len(v) for k, v in data.items()}
            if len(set(lens.values())) != 1:
                raise ValueError(f"{what}: every tensor needs the same number of samples on dim 0, got {lens}")
            self.inputs, self.y, self.n = data, None, next(iter(lens.values()))
        else:
            if not (isinstance(data, (tuple, list)) and len(data) == 2):
                raise TypeError(f"{what} must be (x, y) tensors or a dict of model inputs, got {type(data).__name__}")
            x, y = data
            if len(x) != len(y):
                raise ValueError(f"{what}: x has {len(x)} samples but y has {len(y)}")
            self.inputs, self.y, self.n = x, y, len(x)

    def __len__(self) -> int:
        return self.n

    def take(self, idx):
        """(model inputs, targets or None) of the samples ``idx`` (an index tensor or a slice)."""
        if self.keywords:
            return {k: v[idx] for k, v in self.inputs.items()}, None
        return self.inputs[idx], self.y[idx]

    def call(self, model, inputs):
        return model(**inputs) if self.keywords else model(inputs)


def _custom_loss(loss_fn, out, inputs, y, t_out):
    """The loss of a batch when the data are model keyword inputs or a ``loss_fn`` is given."""
    if loss_fn is not None:
        loss = loss_fn(out, inputs if y is None else (inputs, y), t_out)
    else:
        loss = getattr(out, "loss", None)
        if loss is None:
            raise ValueError("train: with a dict of model inputs, pass loss_fn=(outputs, batch, teacher_outputs) -> loss, "
                             "or include labels so that the model's output has .loss")
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                        f"{'' if not isinstance(loss, torch.Tensor) else f' of shape {tuple(loss.shape)}'}")
    return loss.float()


@torch.no_grad()
def evaluate(model: nn.Module, data, cfg: TrainConfig, loss_fn=None, teacher: nn.Module | None = None) -> dict:
    """Mean loss and accuracy (classification) / perplexity and token accuracy (lm) on (x, y).

    With a dict of model inputs (or a ``loss_fn``): ``{"eval_loss"}``, the sample-weighted mean of the
    batch losses (``loss_fn(outputs, batch, teacher_outputs)``, or the model's ``.loss``).
    """
    samples = _Samples(data, "eval_data")
    dev = _model_device(model)  # batches go where the model is
    if samples.keywords or loss_fn is not None:
        was = model.training
        model.eval()
        tot, n = 0.0, 0
        for s in range(0, len(samples), cfg.eval_batch_size):
            inputs, yb = batch_to(samples.take(slice(s, s + cfg.eval_batch_size)), dev)
            t_out = samples.call(teacher, inputs) if teacher is not None else None
            k = len(next(iter(inputs.values()))) if samples.keywords else len(inputs)
            tot += float(_custom_loss(loss_fn, samples.call(model, inputs), inputs, yb, t_out)) * k
            n += k
        model.train(was)
        return {"eval_loss": tot / n}
    x, y = samples.inputs, samples.y
    was = model.training
    model.eval()
    tot_loss, tot_n, correct = 0.0, 0, 0
    for s in range(0, len(x), cfg.eval_batch_size):
        xb, yb = batch_to((x[s:s + cfg.eval_batch_size], y[s:s + cfg.eval_batch_size]), dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = model(xb)
        logits = logits.float()
        if cfg.task == "lm":
            mask = yb != -100
            n = int(mask.sum())
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1), ignore_index=-100, reduction="sum")
            correct += int(((logits.argmax(-1) == yb) & mask).sum())
        else:
            n = len(yb)
            loss = F.cross_entropy(logits, yb, reduction="sum")
            correct += int((logits.argmax(-1) == yb).sum())
        tot_loss += float(loss)
        tot_n += n
    model.train(was)
    out = {"eval_loss": tot_loss / tot_n, "eval_acc": correct / tot_n}
    if cfg.task == "lm":
        out["eval_ppl"] = math.exp(min(out["eval_loss"], 50))
    return out


class _HiddenCapture:
    def __init__(self, model: nn.Module, names):
        mods = dict(model.named_modules())
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        for n in names:
            if n not in mods:
                raise KeyError(f"hidden_kd names module {n!r}, which the model does not have")
            self.handles.append(mods[n].register_forward_hook(self._hook(n)))

    def _hook(self, name):
        def hook(module, args, output):
            self.out[name] = output[0] if isinstance(output, tuple) else output

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _dist_info():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return world, rank


def _truncate_metrics(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
    from .checkpoint import atomic_write_text

    atomic_write_text(path, "".join(keep))


# ------------------------------------------------------------------ resume
# TrainConfig fields that never change the trained parameters: a resumed run may change them
_RESUME_SAFE = ("threads", "progress", "log_every", "eval_every", "eval_batch_size", "ckpt_every",
                "keep_checkpoints", "device")


def _check_resume_config(stored: dict, current: dict, ckpt_path: str, step: int) -> None:
    """Refuse to resume a checkpoint written with a different config (it would silently continue another run).

    ``steps`` may grow past the checkpoint's step (training goes on, the schedule spans the new total); the
    fields in ``_RESUME_SAFE`` may change; anything else (lr, seed, batch size, extra_config, ...) raises.
    """
    if not stored:  # a checkpoint written without a config (older callers of save_checkpoint)
        return
    cur = json.loads(json.dumps(current))
    diffs = []
    old_t, new_t = stored.get("train") or {}, cur.get("train") or {}
    for key in sorted(set(old_t) | set(new_t)):
        if key in _RESUME_SAFE or old_t.get(key) == new_t.get(key) or key not in old_t:
            continue
        if key == "steps" and isinstance(new_t.get(key), int) and new_t[key] > step:
            continue
        diffs.append(f"TrainConfig.{key}: checkpoint {old_t.get(key)!r}, now {new_t.get(key)!r}")
    for key in sorted(set(stored) & set(cur) - {"train"}):
        if stored[key] != cur[key]:
            diffs.append(f"extra_config[{key!r}]: checkpoint {stored[key]!r}, now {cur[key]!r}")
    if diffs:
        raise ValueError(
            f"resume=True: the checkpoint {ckpt_path} was written by a run with another config ("
            + "; ".join(diffs) + "). Resume with the same TrainConfig and extra_config, or train into a new out_dir")


# ------------------------------------------------------------------ the loop
def train(
    model: nn.Module,
    data,
    config: TrainConfig,
    out_dir: str | None = None,
    eval_data=None,
    teacher: nn.Module | None = None,
    resume: bool = False,
    extra_config: dict | None = None,
    loss_fn=None,
) -> dict:
    """Train ``model`` in place; returns the final metrics dict (``step``, ``loss``, eval metrics).

    Args:
        model: maps a batch of inputs to logits ((B, C) or (B, L, V) for task "lm").
        data: (x, y) tensors with the samples on dim 0, or a dict of model keyword inputs
            (``{"input_ids": (S, L), "attention_mask": (S, L)}``, samples on dim 0): batches are then
            called as ``model(**batch)``, e.g. a Hugging Face model.
        config: :class:`TrainConfig`.
        out_dir: where metrics.jsonl and checkpoints go (None: nothing is written, no resume).
        eval_data: optional (x, y) evaluated every ``eval_every`` steps and at the end.
        teacher: optional model for knowledge distillation (kept in eval mode, never updated).
        resume: continue from the last complete checkpoint in ``out_dir`` if there is one.
        extra_config: JSON-able dict stored in checkpoints beside the TrainConfig (e.g. model and
            conversion settings the caller needs to rebuild the model).
        loss_fn: ``loss_fn(outputs, batch, teacher_outputs) -> scalar`` replaces the task loss (and the
            logit distillation loss): ``batch`` is the dict of model inputs, or ``(x, y)``;
            ``teacher_outputs`` is the teacher's output on the same batch (None without a teacher).
            Needed for dict data unless the model's output has ``.loss``. E.g. hidden-state
            distillation of a converted Hugging Face encoder from its dense original.
    """
    cfg = config
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(cfg).__name__}")
    prev_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(model, data, cfg, out_dir, eval_data, teacher, resume, extra_config, loss_fn)
    finally:
        torch.set_num_threads(prev_threads)


def _train(model, data, cfg, out_dir, eval_data, teacher, resume, extra_config, loss_fn=None) -> dict:
    samples = _Samples(data)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable(outputs, batch, teacher_outputs) -> loss, got {type(loss_fn).__name__}")
    custom = samples.keywords or loss_fn is not None
    world, rank = _dist_info()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({world})")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (where the checkpoints are)")
    dev = resolve_device(cfg.device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    model.to(dev)
    if teacher is not None:
        teacher.to(dev)
    ddp_model = model
    fsdp = world > 1 and cfg.strategy == "fsdp"
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(_pg_backend(dev))
        if fsdp:
            from .sharded import shard_model

            ddp_model = shard_model(model)  # in place: the model's parameters become DTensor shards
        else:
            from torch.nn.parallel import DistributedDataParallel

            ddp_model = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    torch.manual_seed(cfg.seed + 7919 * rank)
    groups = param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    saved_cfg = {"train": cfg.to_dict(), **(extra_config or {})}

    start, ckpt_path = 0, None
    metrics_path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None
    if out_dir and rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    if resume:
        if fsdp:
            from .sharded import latest_sharded, load_sharded

            ckpt_path = latest_sharded(out_dir)
            load = (lambda path, model, opt: load_sharded(path, model, opt, rank))  # noqa: E731
        else:
            ckpt_path, load = latest_checkpoint(out_dir), load_checkpoint
        if ckpt_path is not None:
            # check before loading: a refused resume leaves the model untouched
            if fsdp:
                with open(os.path.join(ckpt_path, "state.json")) as f:
                    st = json.load(f)
            else:
                st = read_state(ckpt_path)
            _check_resume_config(st.get("config") or {}, saved_cfg, ckpt_path, int(st["step"]))
            state = load(ckpt_path, model, opt)
            start = int(state["step"])
            if rank == 0 and metrics_path:
                _truncate_metrics(metrics_path, start)
    if world > 1 and start > 0:
        # DDP broadcast parameters at construction; after loading they are equal on all ranks anyway
        pass
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    if cfg.hidden_kd and teacher is None:
        raise ValueError("hidden_kd needs a teacher model")
    s_cap = _HiddenCapture(model, list(cfg.hidden_kd)) if cfg.hidden_kd else None
    t_cap = _HiddenCapture(teacher, list(cfg.hidden_kd.values())) if cfg.hidden_kd else None
    if teacher is not None:
        from .distill import distillation_loss

    mfile = open(metrics_path, "a") if (metrics_path and rank == 0) else None
    last = {"step": start}
    model.train()
    bar = tqdm(range(start, cfg.steps), desc="train", initial=start, total=cfg.steps,
               disable=not cfg.progress or rank != 0, leave=False)
    t0 = time.perf_counter()
    try:
        for step in bar:
            idx = batch_indices(step, len(samples), cfg.batch_size, cfg.seed)
            per = cfg.batch_size // world
            idx = idx[rank * per:(rank + 1) * per]
            xb, yb = batch_to(samples.take(idx), dev)
            f = lr_factor(step, cfg)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * g["lr_mult"] * f
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = samples.call(ddp_model, xb)
                t_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = samples.call(teacher, xb)
            if custom:
                loss = _custom_loss(loss_fn, logits, xb, yb, t_logits)
            elif teacher is not None:
                logits = logits.float()
                s_flat = logits.reshape(-1, logits.shape[-1])
                loss = distillation_loss(s_flat, yb.reshape(-1), t_logits.float().reshape(-1, logits.shape[-1]),
                                         cfg.kd_lambda, cfg.kd_temperature)
            else:
                loss = _task_loss(logits.float(), yb, cfg.task)
            if s_cap is not None and cfg.hidden_kd_weight:
                for sn, tn in cfg.hidden_kd.items():
                    loss = loss + cfg.hidden_kd_weight * F.mse_loss(s_cap.out[sn].float(), t_cap.out[tn].float().detach())
            finite = torch.isfinite(loss.detach()).float()
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not bool(finite):
                raise NonFiniteLossError(
                    f"non-finite loss ({float(loss.detach()):.4g} on rank {rank}) at step {step}; the run stopped before "
                    f"this update. Last good checkpoint: {ckpt_path or 'none written yet'}. Lower the learning "
                    f"rate, enable grad_clip, or disable bf16, then resume"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None or fsdp:  # FSDP: the norm over DTensor shards (inf: no clipping)
                gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
                if fsdp:
                    from .sharded import full_tensor

                    gn = full_tensor(gn)
            else:
                gn = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
            if not torch.isfinite(gn):
                raise NonFiniteLossError(
                    f"non-finite gradient norm at step {step} (loss {float(loss.detach()):.4g}); the update was not applied. "
                    f"Last good checkpoint: {ckpt_path or 'none written yet'}"
                )
            opt.step()
            done = step + 1
            lval = float(loss.detach())
            if world > 1:
                t = torch.tensor([lval], device=dev)  # NCCL reduces device tensors only
                dist.all_reduce(t)
                lval = float(t) / world
            last = {"step": done, "loss": lval, "lr": cfg.lr * f, "grad_norm": float(gn),
                    "time_s": round(time.perf_counter() - t0, 3)}
            if eval_data is not None and cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                last.update(evaluate(model, eval_data, cfg, loss_fn, teacher if custom else None))
            final_eval = eval_data is not None and done == cfg.steps  # logged once, with the final evaluation
            if mfile and not final_eval and (done % cfg.log_every == 0 or done == cfg.steps or "eval_loss" in last):
                mfile.write(json.dumps(last) + "\n")
                mfile.flush()
            bar.set_postfix(loss=f"{lval:.4f}")
            if out_dir and cfg.ckpt_every and done % cfg.ckpt_every == 0 and done != cfg.steps and fsdp:
                from .sharded import save_sharded

                ckpt_path = save_sharded(out_dir, done, model, opt, saved_cfg, {"metrics": last}, rank,
                                         keep=cfg.keep_checkpoints)
            elif out_dir and cfg.ckpt_every and done % cfg.ckpt_every == 0 and done != cfg.steps:
                if rank == 0:
                    ckpt_path = save_checkpoint(out_dir, done, model, opt, saved_cfg, {"metrics": last},
                                                keep=cfg.keep_checkpoints)
                if world > 1:
                    dist.barrier()
            if fault_requested("kill_after_step", done):
                os.kill(os.getpid(), signal.SIGKILL)
        if eval_data is not None:
            last.update(evaluate(model, eval_data, cfg, loss_fn, teacher if custom else None))
            if mfile:
                mfile.write(json.dumps({**last, "final": True}) + "\n")
        if out_dir and start < cfg.steps and fsdp:
            from .sharded import save_full_model, save_sharded

            save_sharded(out_dir, cfg.steps, model, opt, saved_cfg, {"metrics": last}, rank, keep=cfg.keep_checkpoints)
            save_full_model(os.path.join(out_dir, "model.safetensors"), model, rank)
        elif out_dir and start < cfg.steps and rank == 0:
            save_checkpoint(out_dir, cfg.steps, model, opt, saved_cfg, {"metrics": last}, keep=cfg.keep_checkpoints)
    finally:
        if mfile:
            mfile.close()
        bar.close()
        for cap in (s_cap, t_cap):
            if cap is not None:
                cap.remove()
    return last
