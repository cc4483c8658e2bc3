"""``python experiments/run.py longruns``: issue #18's long runs as a queue that picks up where it stopped.

The expected runs are the grids of the budgets (vit/full, spn_cnn/full, wordlm; seeds 0, 1, 2, from
``claims.expected_runs``). The runs already recorded in each ``runs.json`` are skipped. Every other run is one
call ``python experiments/run.py EXP --seeds S --only KIND [--kd on|off] --append --threads 1``, so each one is
recorded when it finishes. A session that is stopped loses only the runs in flight. The next session runs the
same command and the queue goes on.

    python experiments/run.py longruns --dry-run              # what is missing, estimated minutes, nothing run
    python experiments/run.py longruns --streams 2 --hours 2.5 --experiments vit spn_cnn

``--streams N`` runs N calls at once, one thread each (on 2 cores: 2). ``--hours H`` starts no run that its
estimate says would end more than H hours after the start. A run's estimate is the median training time of
that kind's earlier records (any seed), plus the experiment's evaluation time; with no record yet it is the
per-experiment default below. A distillation run of spn_cnn waits for the dense teacher of its seed when
that run is in the same queue. One log per call goes to ``runs/longruns/`` (not committed). When runs have
finished, ``results/REPORT.md`` is regenerated (``--no-report`` skips it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import claims

NAME = "longruns"
ORDER = ("vit", "spn_cnn", "wordlm")
#: where each budget's runs.json lives, relative to --results
FOLDERS = {"vit": "vit/full", "spn_cnn": "spn_cnn/full", "wordlm": "wordlm"}
#: minutes per run with no record to go by (1 thread, the other core busy; experiments/README.md "Long runs")
DEFAULT_MINUTES = {"vit": 10.0, "spn_cnn": 10.0, "wordlm": 75.0}
#: minutes outside training per call (start-up, data, evaluation, timing, plots)
OVERHEAD_MINUTES = {"vit": 1.5, "spn_cnn": 1.0, "wordlm": 3.0}
RUN_PY = Path(__file__).resolve().parent / "run.py"


@dataclass(frozen=True)
class Job:
    exp: str
    seed: int
    kind: str
    kd: bool | None = None
    minutes: float = field(default=0.0, compare=False)

    @property
    def label(self) -> str:
        return f"{self.exp} {self.kind}{' +KD' if self.kd else ''} s{self.seed}"

    def argv(self) -> list[str]:
        args = [sys.executable, str(RUN_PY), self.exp, "--seeds", str(self.seed), "--only", self.kind, "--append",
                "--threads", "1"]
        if self.exp == "spn_cnn":
            args += ["--kd", "on" if self.kd else "off"]
        return args

    def needs(self) -> Job | None:
        """The run this one should wait for: spn_cnn distillation needs the dense teacher of its seed."""
        return Job("spn_cnn", self.seed, "dense", False) if self.exp == "spn_cnn" and self.kd else None


def _read(path: Path) -> tuple[list[dict], dict | None]:
    if not path.is_file():
        return [], None
    data = json.loads(path.read_text())
    return data.get("runs", []), data.get("meta", {}).get("config")


def _recorded(exp: str, runs: list[dict], seed: int, kind: str, kd: bool | None) -> bool:
    for r in runs:
        if r.get("seed") != seed:
            continue
        if exp == "vit" and kind == "dense@dim=matched" and r["model"].startswith("dense@dim="):
            return True
        if r["model"] == kind and (exp != "spn_cnn" or bool(r.get("kd")) == bool(kd)):
            return True
    return False


def _minutes(exp: str, runs: list[dict], kind: str, kd: bool | None) -> float:
    secs = [r["train_seconds"] for r in runs if r["model"] == kind and (exp != "spn_cnn" or bool(r.get("kd")) == bool(kd))
            and isinstance(r.get("train_seconds"), (int, float))]
    train = statistics.median(secs) / 60 if secs else DEFAULT_MINUTES[exp]
    return train + OVERHEAD_MINUTES[exp]


def missing_jobs(results: Path, experiments=ORDER) -> list[Job]:
    """The runs of the budgets that are not recorded yet, seed by seed in each experiment's grid order."""
    jobs = []
    for exp in experiments:
        runs, config = _read(Path(results) / FOLDERS[exp] / "runs.json")
        seeds, kinds = claims.expected_runs(exp, runs, config)
        for seed in seeds:
            for kind, kd in kinds:
                if not _recorded(exp, runs, seed, kind, kd):
                    jobs.append(Job(exp, seed, kind, kd, _minutes(exp, runs, kind, kd)))
    return jobs


def run_queue(jobs: list[Job], streams: int, hours: float | None, runner: Callable[[Job], int],
              say: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic) -> dict:
    """Run ``jobs`` in order on ``streams`` threads (``runner(job)`` -> exit status). A job waits for the job it
    ``needs()`` while that one is queued or running; no job starts whose estimate would end after ``hours``.
    Returns {"done": [...], "failed": [...], "skipped": [...]} (skipped: no time left for them)."""
    start = clock()
    deadline = None if hours is None else start + hours * 3600
    pending = list(jobs)
    running: set[Job] = set()
    done, failed, skipped = [], [], []
    cond = threading.Condition()

    def blocked(job: Job) -> bool:
        dep = job.needs()
        return dep is not None and (dep in running or dep in pending)

    def take() -> Job | None:
        with cond:
            while True:
                for job in list(pending):
                    if deadline is not None and clock() + job.minutes * 60 > deadline:
                        pending.remove(job)
                        skipped.append(job)
                        continue
                    if not blocked(job):
                        pending.remove(job)
                        running.add(job)
                        return job
                if not pending:
                    return None
                cond.wait()  # every pending job waits for a running one

    def stream(i: int) -> None:
        while (job := take()) is not None:
            t0 = clock()
            say(f"[stream {i}] start  {job.label} (estimate {job.minutes:.0f} min)")
            try:
                rc = runner(job)
            except Exception as exc:  # noqa: BLE001 - a crashed runner fails this job, not the queue
                say(f"[stream {i}] {job.label}: {type(exc).__name__}: {exc}")
                rc = -1
            with cond:
                running.discard(job)
                (done if rc == 0 else failed).append(job)
                cond.notify_all()
            say(f"[stream {i}] {'done  ' if rc == 0 else f'FAILED (exit {rc})'} {job.label} "
                f"after {(clock() - t0) / 60:.1f} min")

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(max(1, streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"done": done, "failed": failed, "skipped": skipped}


def subprocess_runner(log_dir: Path) -> Callable[[Job], int]:
    def run(job: Job) -> int:
        log_dir.mkdir(parents=True, exist_ok=True)
        name = f"{job.exp}-s{job.seed}-{job.kind}{'-kd' if job.kd else ''}".replace("/", "_").replace("@", "_")
        with open(log_dir / f"{name}.log", "w") as log:
            return subprocess.run(job.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  cwd=RUN_PY.parent.parent).returncode
    return run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiments", nargs="+", choices=ORDER, default=list(ORDER), help="which budgets (in this order)")
    p.add_argument("--streams", type=int, default=2, help="runs at once, one thread each (default 2: the 2 cores)")
    p.add_argument("--hours", type=float, default=None,
                   help="start no run whose estimate ends more than this many hours from now (default: no limit)")
    p.add_argument("--dry-run", action="store_true", help="list the missing runs with their estimates; run nothing")
    p.add_argument("--results", default="results", help="folder holding vit/full, spn_cnn/full, wordlm")
    p.add_argument("--log-dir", default="runs/longruns", help="one log per run (default runs/longruns)")
    p.add_argument("--no-report", action="store_true", help="do not regenerate RESULTS/REPORT.md at the end")


def run(args) -> int:
    if args.streams < 1:
        raise SystemExit(f"--streams must be >= 1, got {args.streams}")
    if args.hours is not None and args.hours <= 0:
        raise SystemExit(f"--hours must be > 0, got {args.hours}")
    jobs = missing_jobs(Path(args.results), args.experiments)
    total = sum(j.minutes for j in jobs)
    print(f"{len(jobs)} runs missing in {', '.join(args.experiments)}: about {total / 60:.1f} h on one thread, "
          f"{total / 60 / args.streams:.1f} h on {args.streams} streams")
    if args.dry_run:
        for j in jobs:
            print(f"  {j.label:<40} {j.minutes:6.1f} min   python experiments/run.py {' '.join(j.argv()[2:])}")
        return 0
    out = run_queue(jobs, args.streams, args.hours, subprocess_runner(Path(args.log_dir)))
    print(f"finished {len(out['done'])}, failed {len(out['failed'])}, not started for lack of time "
          f"{len(out['skipped'])}")
    for j in out["failed"]:
        print(f"  failed: {j.label} (log in {args.log_dir})")
    if out["done"] and not args.no_report:
        from . import report

        rp = argparse.ArgumentParser()
        report.add_arguments(rp)
        report.run(rp.parse_args(["--results", args.results]))
    return 1 if out["failed"] else 0
