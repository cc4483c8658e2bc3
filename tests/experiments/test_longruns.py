"""The long-run queue: which runs are missing, the order and waiting of its streams, the time limit, the CLI."""

import json
import threading
import time

import pytest

from experiments import claims, longruns
from experiments.longruns import Job, missing_jobs, run_queue
from experiments.run import main


def _write(root, exp, runs, config=None):
    folder = root / longruns.FOLDERS[exp]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "runs.json").write_text(json.dumps({"meta": {"config": config}, "runs": runs}))


def test_missing_jobs_skip_recorded_runs_and_cover_three_seeds(tmp_path):
    # the last call recorded seeds [1] in its config: the queue still expects seeds 0, 1 and 2
    _write(tmp_path, "vit", [
        {"seed": 0, "model": "dense", "train_seconds": 600.0},
        {"seed": 0, "model": "dense@dim=120", "train_seconds": 700.0},
        {"seed": 1, "model": "dense", "train_seconds": 900.0},
    ], config={"budget": "full", "seeds": [1]})
    # the recorded config is that of the last call, which trained without KD: the grid still has the KD runs
    _write(tmp_path, "spn_cnn", [
        {"seed": 0, "model": "spn@1:1:1", "kd": False, "train_seconds": 300.0},
    ], config={"budget": "full", "seeds": [0], "kd": "off", "only": ["spn@1:1:1"]})
    jobs = missing_jobs(tmp_path, ["vit", "spn_cnn"])
    labels = {j.label for j in jobs}
    seeds, kinds = claims.expected_runs("vit", [{"model": "dense@dim=120"}], None)
    assert seeds == [0, 1, 2]
    n_vit = 3 * len(kinds) - 3
    assert sum(j.exp == "vit" for j in jobs) == n_vit
    assert "vit dense s0" not in labels and "vit dense s1" not in labels and "vit dense s2" in labels
    assert "vit dense@dim=120 s0" not in labels and "vit dense@dim=120 s1" in labels
    # spn_cnn: the recorded run without KD is skipped, its KD twin is not
    assert "spn_cnn spn@1:1:1 s0" not in labels and "spn_cnn spn@1:1:1 +KD s0" in labels
    # estimates: the median of the kind's records (+ evaluation time), the default without records
    dense2 = next(j for j in jobs if j.label == "vit dense s2")
    assert dense2.minutes == pytest.approx(750 / 60 + longruns.OVERHEAD_MINUTES["vit"])
    lowrank = next(j for j in jobs if j.label == "vit lowrank s0")
    assert lowrank.minutes == pytest.approx(longruns.DEFAULT_MINUTES["vit"] + longruns.OVERHEAD_MINUTES["vit"])
    # each job is one recorded call of the experiment
    argv = next(j for j in jobs if j.label == "spn_cnn spn@1:1:1 +KD s0").argv()
    assert argv[2:] == ["spn_cnn", "--seeds", "0", "--only", "spn@1:1:1", "--append", "--threads", "1", "--kd", "on"]


def test_queue_runs_in_order_and_kd_waits_for_its_teacher():
    jobs = [Job("spn_cnn", 0, "dense", False, 1), Job("spn_cnn", 0, "spn@1:1:1", True, 1),
            Job("spn_cnn", 0, "spn@2:1:1", False, 1), Job("vit", 0, "lowrank", None, 1)]
    events, lock = [], threading.Lock()

    def runner(job):
        with lock:
            events.append(("start", job.label))
        time.sleep(0.05 if job.kind == "dense" else 0.01)
        with lock:
            events.append(("end", job.label))
        return 0

    out = run_queue(jobs, streams=2, hours=None, runner=runner, say=lambda s: None)
    assert sorted(j.label for j in out["done"]) == sorted(j.label for j in jobs) and not out["failed"]
    assert events.index(("end", "spn_cnn dense s0")) < events.index(("start", "spn_cnn spn@1:1:1 +KD s0"))
    # the other stream did not wait: the run without KD started before the teacher finished
    assert events.index(("start", "spn_cnn spn@2:1:1 s0")) < events.index(("end", "spn_cnn dense s0"))


def test_queue_failed_runs_are_reported_and_do_not_block_dependents():
    jobs = [Job("spn_cnn", 1, "dense", False, 1), Job("spn_cnn", 1, "spn@1:1:1", True, 1)]
    out = run_queue(jobs, streams=1, hours=None, runner=lambda j: 3 if j.kind == "dense" else 0, say=lambda s: None)
    assert [j.kind for j in out["failed"]] == ["dense"] and [j.kind for j in out["done"]] == ["spn@1:1:1"]


def test_queue_starts_no_run_that_would_end_after_the_time_limit():
    now = [0.0]
    jobs = [Job("vit", 0, "a", None, 30), Job("vit", 0, "b", None, 50), Job("vit", 0, "c", None, 20)]

    def runner(job):
        now[0] += job.minutes * 60
        return 0

    out = run_queue(jobs, streams=1, hours=1.0, runner=runner, say=lambda s: None, clock=lambda: now[0])
    assert [j.kind for j in out["done"]] == ["a", "c"] and [j.kind for j in out["skipped"]] == ["b"]


def test_cli_dry_run_lists_missing_runs_and_runs_nothing(tmp_path, capsys):
    _write(tmp_path, "wordlm", [{"seed": s, "model": "dense", "train_seconds": 2400.0} for s in (0, 1, 2)])
    assert main(["longruns", "--dry-run", "--results", str(tmp_path), "--experiments", "wordlm"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("15 runs missing in wordlm")
    assert "python experiments/run.py wordlm --seeds 0 --only spn@0.5 --append --threads 1" in out
    assert "wordlm dense s0" not in out
    assert not (tmp_path / "REPORT.md").exists()
    with pytest.raises(SystemExit, match="--streams"):
        main(["longruns", "--dry-run", "--streams", "0", "--results", str(tmp_path)])
