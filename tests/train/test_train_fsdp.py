"""``torchrun --nproc_per_node=2 -m strassenkit train ... --strategy fsdp``: FSDP2 on CPU/gloo against one
process, and sharded torch.distributed.checkpoint checkpoints that survive kill -9 in the middle of a
save and resume bit-identically. Two torchrun launches:

1. a fresh 2-process run killed (SIGKILL) while writing its step-4 checkpoint: the latest checkpoint
   stays step 2 and the torn directory is left behind;
2. the same command with ``--resume`` to step 6: steps 3 and 4 repeat with exactly the losses and
   gradient norms the killed run logged (the state after the resume is bit-identical), the torn
   directory is gone, and the gathered full model matches a 1-process run to 1e-5.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from strassenkit.cli import main

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")

ARGS = ["--task", "synthetic", "--stl", "--steps", "6", "--ckpt-every", "2", "--eval-every", "0", "--batch-size", "32",
        "--lr", "1e-2", "--strategy", "fsdp", "--device", "cpu", "--no-progress"]


def _torchrun(out, cfg, *more, fault=None):
    env = {k: v for k, v in os.environ.items() if k not in ("STRASSENKIT_FAULT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env["STRASSENKIT_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "strassenkit",
           "train", *ARGS, "--config", str(cfg), "--out", str(out), *more]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _metrics(path):
    return {d["step"]: d for d in map(json.loads, open(path))}


def test_fsdp_two_processes_kill9_in_checkpoint_resume_exact_and_match_one_process(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"train": {"log_every": 1, "keep_checkpoints": 3}}))
    out = tmp_path / "fsdp"
    root = out / "checkpoints_fsdp"
    p = _torchrun(out, cfg, fault="kill_in_checkpoint:4")
    assert p.returncode != 0, p.stderr[-3000:]
    assert json.load(open(root / "latest.json"))["step"] == 2
    assert (root / ".tmp-step_00000004").is_dir()  # torn: shards written, never renamed
    killed = _metrics(out / "metrics.jsonl")
    assert {3, 4} <= set(killed)  # logged before the torn save

    p = _torchrun(out, cfg, "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = _metrics(out / "metrics.jsonl")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # no duplicated lines after the restart
    for s in (3, 4):
        for key in ("loss", "grad_norm"):
            assert resumed[s][key] == killed[s][key], (s, key)  # exact: the same state as before the kill
    assert json.load(open(root / "latest.json"))["step"] == 6
    assert not any(n.startswith(".tmp-") for n in os.listdir(root))
    assert sorted(n for n in os.listdir(root) if n.startswith("step_")) == [f"step_{s:08d}" for s in (2, 4, 6)]
    state = json.load(open(root / "step_00000006" / "state.json"))
    assert state["format"] == "dcp" and state["world_size"] == 2 and state["config"]["train"]["strategy"] == "fsdp"
    assert json.load(open(out / "summary.json"))["step"] == 6

    # one process, same command (the strategy does not apply to a single process)
    one = tmp_path / "one"
    assert main(["train", *ARGS, "--config", str(cfg), "--out", str(one)]) == 0
    ck = json.load(open(one / "checkpoints" / "latest.json"))
    ref = load_file(one / "checkpoints" / ck["dir"] / "model.safetensors")
    full = load_file(out / "model.safetensors")
    assert set(full) == set(ref)
    for k in ref:  # same global batches; gradients reduced over 2 x 16 samples instead of 32
        torch.testing.assert_close(full[k], ref[k], rtol=0, atol=1e-5, msg=k)
