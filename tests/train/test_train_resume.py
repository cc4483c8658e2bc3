"""Kill -9 and resume, crash while writing a checkpoint, and DDP (torchrun, 2 processes) vs 1 process."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from strassenkit.cli import main

ARGS = ["--task", "synthetic", "--stl", "--steps", "30", "--ckpt-every", "10", "--eval-every", "0",
        "--batch-size", "32", "--lr", "1e-2", "--no-progress"]


def _env(**extra):
    env = dict(os.environ)
    env.pop("STRASSENKIT_FAULT", None)
    env.update(extra)
    return env


def _cli(out, *more, fault=None):
    env = _env(**({"STRASSENKIT_FAULT": fault} if fault else {}))
    return subprocess.run([sys.executable, "-m", "strassenkit", "train", *ARGS, "--out", str(out), *more],
                          env=env, capture_output=True, text=True, timeout=300)


def _final(out):
    ck = json.load(open(os.path.join(out, "checkpoints", "latest.json")))
    return load_file(os.path.join(out, "checkpoints", ck["dir"], "model.safetensors")), ck["step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert main(["train", *ARGS, "--out", str(out)]) == 0
    return out


def test_sigkill_and_crash_during_checkpoint_then_resume_is_exact(uninterrupted, tmp_path):
    ref, step = _final(uninterrupted)
    assert step == 30
    out = tmp_path / "run"
    # 1) killed with SIGKILL after step 13 (last checkpoint: step 10)
    p = _cli(out, fault="kill_after_step:13")
    assert p.returncode == -9, p.stderr[-2000:]
    assert json.load(open(out / "checkpoints" / "latest.json"))["step"] == 10
    steps = [json.loads(s)["step"] for s in open(out / "metrics.jsonl")]
    assert max(steps) >= 10
    # 2) resumed, and killed again in the middle of writing the step-20 checkpoint
    p = _cli(out, "--resume", fault="kill_in_checkpoint:20")
    assert p.returncode == -9, p.stderr[-2000:]
    assert json.load(open(out / "checkpoints" / "latest.json"))["step"] == 10  # the torn checkpoint is not used
    assert any(n.startswith(".tmp-") for n in os.listdir(out / "checkpoints"))
    # 3) resumed to the end (in this process): same parameters as the uninterrupted run
    assert main(["train", *ARGS, "--out", str(out), "--resume"]) == 0
    got, step = _final(out)
    assert step == 30 and set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)
    assert not any(n.startswith(".tmp-") for n in os.listdir(out / "checkpoints"))
    # metric lines are not duplicated by the restarts
    steps = [json.loads(s)["step"] for s in open(out / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 30


def test_resume_with_different_options_is_refused_and_safe_ones_are_applied(uninterrupted, tmp_path, capsys):
    out = tmp_path / "r"
    shutil.copytree(uninterrupted, out)
    before = _final(out)[0]
    # a finished run resumed with result-changing options is refused (exit 2), naming every differing option
    assert main(["train", "--task", "synthetic", "--steps", "5", "--lr", "0.5", "--out", str(out), "--resume",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--steps 5" in err and "--lr 0.5" in err and "(the run has 0.01)" in err
    assert _final(out)[1] == 30
    torch.testing.assert_close(_final(out)[0], before, rtol=0, atol=0)
    # options it was started with, or none at all: the stored run (finished: nothing more to train)
    assert main(["train", *ARGS, "--out", str(out), "--resume"]) == 0
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert json.load(open(out / "summary.json"))["step"] == 30
    # more steps is safe: applied and said so
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--steps", "35", "--threads", "1", "--no-progress"]) == 0
    assert "--steps: 30 -> 35" in capsys.readouterr().err
    assert _final(out)[1] == 35 and json.load(open(out / "summary.json"))["step"] == 35


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_ddp_two_processes_match_one_process(uninterrupted, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "strassenkit", "train", *ARGS, "--out", str(out)]
    p = subprocess.run(cmd, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ref, _ = _final(uninterrupted)
    got, step = _final(out)
    assert step == 30
    for k in ref:  # same global batches; gradients averaged over 2 x 16 samples instead of 32
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
    s1 = json.load(open(uninterrupted / "summary.json"))
    s2 = json.load(open(out / "summary.json"))
    assert s2["loss"] == pytest.approx(s1["loss"], rel=1e-4)
