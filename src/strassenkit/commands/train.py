"""``strassenkit train``: train a built-in small task with the resumable training loop.

Tasks (all offline):
- ``synthetic``: sequence classification, x (n, 8, 16) Gaussian, 4 classes given by a fixed random
  function of the token mean and the first token; model: token MLP (Linear 16->32, 32->32) + mean + head.
- ``synthetic-lm``: next-token prediction on a random 16-symbol Markov chain (sequences of 16);
  model: embedding -> Linear -> GELU -> Linear head. Marked causal (``model.is_causal = True``), so
  STL conversion uses row_tile=1.
- ``digits``: the small ViT of :mod:`strassenkit._models.vit` on scikit-learn's real 8x8 digits.

The synthetic tasks' models and data are in :mod:`strassenkit._models.synthetic`.

Examples::

    strassenkit train --task digits --stl --steps 300 --out runs/digits-stl
    strassenkit train --task digits --stl --steps 300 --out runs/digits-stl --resume   # after a kill
    torchrun --nproc_per_node=2 -m strassenkit train --task synthetic --out runs/ddp
    strassenkit train --config my.json --out runs/x
    # pretrained conversion: dense run -> STL, calibrated on 8 batches, fine-tuned with distillation
    strassenkit train --task digits --steps 300 --out runs/digits-dense
    strassenkit train --task digits --from-dense runs/digits-dense --stl --calibrate-batches 8 --alternate 2 \\
        --kd 0.5 --steps 100 --out runs/digits-stl-calib

``--config`` JSON: ``{"task": "digits", "train": {TrainConfig fields}, "surgery": {"config":
{"type": "STLConfig", "tile": 4, "rank": 24}, "targets": "all-linear"}}``. Command-line options
override it. With ``--resume`` and an existing checkpoint, the checkpoint's stored config is used,
so the resumed run continues exactly the run that was killed. Options given with ``--resume`` must
agree with the stored ones, except those that do not change the result (``--threads``,
``--ckpt-every``, ``--eval-every``, ``--no-progress``) and a larger ``--steps`` (train on: the cosine
schedule then spans the new number of steps from the checkpoint on); those are applied and printed.
Any other difference is refused (exit 2) with the list of differing options.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from .._models.synthetic import BigramLM, TokenMLP, synthetic_data, synthetic_lm_data

TASKS = ("synthetic", "synthetic-lm", "digits")


def add_arguments(parser) -> None:
    parser.add_argument("--task", choices=TASKS, default=None, help="built-in task (default synthetic)")
    parser.add_argument("--out", required=True, help="output directory (metrics.jsonl, checkpoints/, summary.json)")
    parser.add_argument("--config", default=None, help="JSON file with task / train / surgery settings")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="global batch size")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default 1; 0 = torch default)")
    parser.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast (on the training device)")
    parser.add_argument("--device", default=None, help="training device: cpu, cuda, cuda:1 (default: CUDA if available)")
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default=None,
                        help="multi-process (torchrun): DistributedDataParallel (default) or FSDP2 with sharded checkpoints")
    parser.add_argument("--ckpt-every", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--stl", action="store_true", help="convert all linear layers (except the head) to STLinear")
    parser.add_argument("--spn", action="store_true", help="convert all linear layers (except the head) to SPNLinear")
    parser.add_argument("--tile", type=int, default=None, help="STL tile (default 4)")
    parser.add_argument("--rank", type=int, default=None, help="STL rank (default 24)")
    parser.add_argument("--init", default=None, help="STL init family or catalogue name (default random)")
    parser.add_argument("--row-tile", type=int, default=None)
    parser.add_argument("--enc-lr-mult", type=float, default=None, help="lr multiplier for STL enc_x and dec")
    parser.add_argument("--from-dense", default=None, help="start from the last checkpoint of a dense run of the same task")
    parser.add_argument("--calibrate-batches", type=int, default=None,
                        help="least-squares calibration of converted layers on N training batches (needs --from-dense)")
    parser.add_argument("--alternate", type=int, default=None,
                        help="calibration rounds that also refit enc_x and dec (default 0)")
    parser.add_argument("--kd", type=float, default=None, help="distill from the dense model with this weight (needs --from-dense)")
    parser.add_argument("--results", default=None, help="also write the small JSON/Markdown outputs here")
    parser.add_argument("--no-progress", action="store_true")


# ------------------------------------------------------------------ tasks
def build(task: str, seed: int):
    """(model, train_data, eval_data, train-config overrides) for a built-in task."""
    torch.manual_seed(seed)
    if task == "synthetic":
        tr, ev = synthetic_data()
        return TokenMLP(), tr, ev, {"task": "classification"}
    if task == "synthetic-lm":
        tr, ev = synthetic_lm_data()
        return BigramLM(), tr, ev, {"task": "lm"}
    if task == "digits":
        from .._models.digits import load_digits_split
        from .._models.vit import ViT

        xtr, ytr, xte, yte = load_digits_split(seed=0)
        return ViT(image_size=8, patch_size=2, dim=64, depth=2, heads=4), (xtr, ytr), (xte, yte), {"task": "classification"}
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


def _read_config(path: str) -> dict:
    try:
        with open(path) as f:
            user = json.load(f)
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(user, dict):
        raise ValueError(f"--config {path}: must hold a JSON object {{\"task\": ..., \"train\": {{...}}}}, "
                         f"got {type(user).__name__}")
    return user


def _resolve(args) -> dict:
    """Merge --config JSON and command-line options into one JSON-able run config."""
    cfg: dict = {"task": "synthetic", "train": {}, "surgery": None, "from_dense": None, "calibrate": None, "kd": None}
    if args.config:
        user = _read_config(args.config)
        unknown = sorted(set(user) - set(_KEYS))
        if unknown:
            raise ValueError(f"--config {args.config}: unknown keys {unknown}; allowed: {', '.join(_KEYS)}")
        cfg.update(user)
    if args.task:
        cfg["task"] = args.task
    tr = dict(cfg.get("train") or {})
    for opt, key in (("steps", "steps"), ("batch_size", "batch_size"), ("lr", "lr"), ("seed", "seed"),
                     ("threads", "threads"), ("bf16", "bf16"), ("ckpt_every", "ckpt_every"), ("eval_every", "eval_every"),
                     ("device", "device"), ("strategy", "strategy")):
        v = getattr(args, opt)
        if v is not None:
            tr[key] = v
    tr.setdefault("steps", 200)
    tr.setdefault("batch_size", 64)
    tr.setdefault("lr", 3e-3)
    tr.setdefault("ckpt_every", 50)
    tr.setdefault("eval_every", 50)
    if args.no_progress:
        tr["progress"] = False
    if args.stl and args.spn:
        raise ValueError("choose one of --stl and --spn")
    if args.stl:
        cfg["surgery"] = {"config": {"type": "STLConfig", "tile": _or(args.tile, 4), "rank": _or(args.rank, 24),
                                     "init": _or(args.init, "random"),
                                     "row_tile": args.row_tile, "seed": args.seed or 0,
                                     "keep_dense_weight": False}, "targets": "all-linear"}
    elif args.spn:
        cfg["surgery"] = {"config": {"type": "SPNConfig", "rank_ratio": 0.5}, "targets": "all-linear"}
    if args.enc_lr_mult is not None:
        tr.setdefault("lr_groups", {})
        tr["lr_groups"].update({"enc_x": args.enc_lr_mult, "dec": args.enc_lr_mult})
    if args.from_dense:
        cfg["from_dense"] = args.from_dense
    if args.calibrate_batches:
        cfg["calibrate"] = {"batches": args.calibrate_batches, "alternate": _or(args.alternate, 0)}
    if args.kd is not None:
        cfg["kd"] = args.kd
    cfg["train"] = tr
    return cfg


_KEYS = ("task", "train", "surgery", "from_dense", "calibrate", "kd")


def _or(value, default):
    return default if value is None else value


class ResumeMismatch(ValueError):
    """``--resume`` with options that differ from the stored run's."""


# options that never change the trained parameters: applied on resume
_SAFE_TRAIN = {"threads": "--threads", "ckpt_every": "--ckpt-every", "eval_every": "--eval-every", "progress": "--no-progress"}
_TRAIN_FLAGS = {"steps": "--steps", "batch_size": "--batch-size", "lr": "--lr", "seed": "--seed", "bf16": "--bf16",
                "device": "--device", "strategy": "--strategy", **_SAFE_TRAIN}


def _requested(args) -> list[tuple[str, tuple, object]]:
    """(option, path into the run config, value) for every option the user actually gave."""
    out = []
    if getattr(args, "config", None):
        user = _read_config(args.config)

        def walk(prefix, v):
            if isinstance(v, dict):
                for k, sub in v.items():
                    walk((*prefix, k), sub)
            else:
                out.append((f"--config {'.'.join(prefix)}", prefix, v))

        walk((), user)
    if args.task:
        out.append(("--task", ("task",), args.task))
    for key, flag in _TRAIN_FLAGS.items():
        v = (False if args.no_progress else None) if key == "progress" else getattr(args, key)
        if v is not None:
            out.append((flag, ("train", key), v))
    if args.stl or args.spn:
        out.append(("--stl" if args.stl else "--spn", ("surgery", "config", "type"), "STLConfig" if args.stl else "SPNConfig"))
    for key in ("tile", "rank", "init", "row_tile"):
        if args.stl and getattr(args, key) is not None:
            out.append((f"--{key.replace('_', '-')}", ("surgery", "config", key), getattr(args, key)))
    if args.enc_lr_mult is not None:
        out += [("--enc-lr-mult", ("train", "lr_groups", k), args.enc_lr_mult) for k in ("enc_x", "dec")]
    if args.from_dense:
        out.append(("--from-dense", ("from_dense",), args.from_dense))
    if args.calibrate_batches:
        out.append(("--calibrate-batches", ("calibrate", "batches"), args.calibrate_batches))
    if args.alternate is not None:
        out.append(("--alternate", ("calibrate", "alternate"), args.alternate))
    if args.kd is not None:
        out.append(("--kd", ("kd",), args.kd))
    return out


def _get(d, path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def reconcile_resume(stored: dict, requested, step: int) -> tuple[dict, list[str]]:
    """The config to resume with and notes on what was applied; ResumeMismatch lists refused differences.

    ``stored``: the run config of the checkpoint; ``requested``: :func:`_requested`; ``step``: its step.
    """
    cfg = json.loads(json.dumps(stored))  # a deep copy
    cfg["train"] = dict(cfg.get("train") or {})
    notes, refused = [], []
    for flag, path, want in requested:
        have = _get(stored, path)
        if have == want:
            continue
        if path[0] == "train" and len(path) == 2 and path[1] in _SAFE_TRAIN:
            cfg["train"][path[1]] = want
            notes.append(f"{flag}: {have!r} -> {want!r}")
        elif path == ("train", "steps") and isinstance(want, int) and want > step:
            cfg["train"]["steps"] = want
            notes.append(f"--steps: {have!r} -> {want!r} (training goes on from step {step}; the learning-rate "
                         f"schedule now spans {want} steps)")
        else:
            why = f" (the checkpoint is at step {step})" if path == ("train", "steps") else ""
            refused.append(f"{flag} {want!r} (the run has {have!r}){why}")
    if refused:
        raise ResumeMismatch(
            f"--resume: the checkpoint's run was started with other options: {'; '.join(refused)}. Resume with the "
            f"original options (or leave them out: the stored ones are used), or train into a new --out")
    return cfg, notes


def run_config(cfg: dict, out: str, resume: bool = False, results: str | None = None, requested=None) -> dict:
    """Build the task, (load dense weights, convert, calibrate,) train; returns the final metrics.

    ``cfg`` keys: task, train (TrainConfig fields), surgery ({"config": {...}, "targets": ...}),
    from_dense (directory of an earlier dense run whose last checkpoint initializes the model),
    calibrate ({"batches": int, "alternate": int}: least-squares calibration of the converted layers
    against the dense model on that many training batches), kd (distillation weight; the dense model
    is the teacher). ``results``: a directory that receives only the small JSON/Markdown outputs.
    ``requested``: the options given on the command line (:func:`_requested`); on resume they are
    checked against the stored run (:func:`reconcile_resume`).
    """
    import copy

    from ..surgery import calibrate_, config_from_dict, strassenify_
    from ..train import TrainConfig, batch_indices, evaluate, latest_checkpoint, load_checkpoint, train

    from ..train import read_state

    from ..train.sharded import latest_sharded

    rank0 = int(os.environ.get("RANK", "0")) == 0
    ck = (latest_checkpoint(out) or latest_sharded(out)) if resume else None  # FSDP runs: checkpoints_fsdp/
    if ck is not None:
        state = read_state(ck)
        stored = state["config"] if isinstance(state["config"], dict) else {}
        cfg = {k: stored.get(k) for k in _KEYS}
        if requested is not None:
            cfg, notes = reconcile_resume(cfg, requested, state["step"])
            if notes and rank0:
                print(f"strassenkit train: resuming {ck} with: {'; '.join(notes)}", file=sys.stderr)
    tcfg = TrainConfig.from_dict(dict(cfg["train"]))
    model, tr, ev, over = build(cfg["task"], tcfg.seed)
    if tcfg.task != over["task"]:
        tcfg = TrainConfig.from_dict({**tcfg.to_dict(), "task": over["task"]})
    stages: dict = {}
    dense = teacher = None
    if cfg.get("from_dense"):
        src = latest_checkpoint(cfg["from_dense"])
        if src is None:
            raise FileNotFoundError(f"from_dense={cfg['from_dense']!r} has no checkpoint; train a dense model there first")
        load_checkpoint(src, model, restore_rng=False)
        dense = copy.deepcopy(model).eval()
        stages["dense"] = evaluate(dense, ev, tcfg)
        if cfg.get("kd"):
            teacher = dense
            tcfg = TrainConfig.from_dict({**tcfg.to_dict(), "kd_lambda": float(cfg["kd"])})
    elif cfg.get("calibrate") or cfg.get("kd"):
        raise ValueError("calibrate and kd need from_dense (a directory with a trained dense run of the same task)")
    if cfg.get("surgery"):
        s = cfg["surgery"]
        strassenify_(model, config_from_dict(s["config"]), targets=s.get("targets", "all-linear"))
    calib = None
    if dense is not None and ck is None:
        stages["converted"] = evaluate(model, ev, tcfg)
        c = cfg.get("calibrate")
        if c:
            n = int(c.get("batches", 4))
            batches = [tr[0][batch_indices(k, len(tr[0]), tcfg.batch_size, tcfg.seed + 1)] for k in range(n)]
            calib = calibrate_(model, batches, reference=dense, alternate=int(c.get("alternate", 0)),
                               progress=tcfg.progress)
            stages["calibrated"] = evaluate(model, ev, tcfg)
            if rank0:
                print(calib.table())
    full = {k: cfg.get(k) for k in _KEYS}
    full["train"] = tcfg.to_dict()
    if rank0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(full, f, indent=2)
    result = train(model, tr, tcfg, out_dir=out, eval_data=ev, resume=resume, teacher=teacher,
                   extra_config={k: full[k] for k in _KEYS if k != "train"})
    sharded = int(os.environ.get("WORLD_SIZE", "1")) > 1 and tcfg.strategy == "fsdp"
    if rank0 or sharded:  # an FSDP forward is collective: every rank runs it
        from ..cost import count

        rep = count(model, ev[0][:1])
    if rank0:
        result["macs_per_sample"] = rep.macs
        result["dense_macs_per_sample"] = rep.dense_macs
        result["params"] = sum(p.numel() for p in model.parameters())
        if stages:
            result["stages"] = stages
        outputs = {"summary.json": json.dumps({"config": full, **result}, indent=2)}
        if calib is not None:
            outputs["calibration.json"] = calib.to_json()
            outputs["calibration.md"] = "```\n" + calib.table() + "\n```\n"
        for d in [out] + ([results] if results else []):
            os.makedirs(d, exist_ok=True)
            for name, text in outputs.items():
                with open(os.path.join(d, name), "w") as f:
                    f.write(text)
    return result


def run(args) -> int:
    from ..train import NonFiniteLossError

    try:
        cfg = _resolve(args)
        result = run_config(cfg, args.out, resume=args.resume, results=args.results, requested=_requested(args))
    except NonFiniteLossError as e:
        print(f"strassenkit train: stopped: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2))
    return 0
