"""The plain-vs-residual study's trainers, run as subprocesses `parallel` at a time: each
with its log in its model dir and its share of the CPU (or its GPU), its finished epochs
reported from history.json, a failed run's last log lines, and Ctrl-C handed on to the
running trainers so that each saves a checkpoint.
"""

import os
import shlex
import signal
import subprocess
import sys
import time

from scripts import experiment_runs
from scripts.experiment_jobs import Job

# The trainers run from the repo root (`python -m trainer.main`).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_FILE = "trainer.log"
TAIL_LINES = 15


def duration(seconds: float) -> str:
  """A wall time as H:MM:SS, for the study's console lines."""
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _tail(path: str, lines: int = TAIL_LINES) -> list[str]:
  try:
    with open(path, errors="replace") as f:
      return [line.rstrip() for line in f.readlines()[-lines:]]
  except OSError:
    return []


def final_line(job: Job) -> str:
  """A run's result for the console: final test error, and the best epoch's, from
  metrics.json."""
  metrics = experiment_runs.read_metrics(job.model_dir) or {}
  if "test_accuracy" not in metrics:
    return "no metrics.json"
  return (f"final test error {experiment_runs.error_percent(metrics['test_accuracy']):.2f}% "
          f"(best epoch {experiment_runs.error_percent(metrics['best_test_accuracy']):.2f}%: "
          "test-selected, not a result)")


class _Running:
  """A started trainer process and what has been reported of it."""

  def __init__(self, job: Job, process: subprocess.Popen, log, slot: int,
               last_epoch: int):
    self.job, self.process, self.log, self.slot = job, process, log, slot
    self.start = time.time()
    self.last_epoch = last_epoch  # the last epoch reported (or held before a resume)

  def report_new_epochs(self) -> None:
    """Prints the epochs finished since the last call (from the trainer's history.json)."""
    try:
      history = experiment_runs.read_history(self.job.model_dir) or []
    except experiment_runs.RunError:
      return  # Unreadable for a moment; the trainer replaces it atomically. Next poll.
    for h in history:
      if h["epoch"] <= self.last_epoch:
        continue
      planned = self.job.expected["epochs"]
      split = "test" if "test_accuracy" in h else "validation"
      print(f"  {self.job.label} epoch {h['epoch']:g}{f'/{planned}' if planned else ''}: train "
            f"error {experiment_runs.error_percent(h['train_accuracy']):.2f}%, {split} error "
            f"{experiment_runs.error_percent(h[f'{split}_accuracy']):.2f}% "
            f"({duration(time.time() - self.start)})", flush=True)
      self.last_epoch = h["epoch"]


def _child_env(slot: int, parallel: int, gpus: list[str] | None) -> dict[str, str]:
  env = dict(os.environ)
  if gpus:
    env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
  elif parallel > 1:
    # N processes each sizing its thread pools to all cores would oversubscribe the CPU.
    threads = str(max(1, len(os.sched_getaffinity(0)) // parallel))
    env.setdefault("TF_NUM_INTRAOP_THREADS", threads)
    env.setdefault("OMP_NUM_THREADS", threads)
  return env


def run_jobs(jobs: list[Job], extra_args: list[str], parallel: int,
             gpus: list[str] | None) -> tuple[list[str], bool]:
  """Runs the jobs, `parallel` at a time, reporting progress.

  Returns:
    one line per failed job, and whether the user interrupted the study (Ctrl-C).
  """
  interrupted = False
  pending, running, failures = list(jobs), [], []
  free_slots = list(range(parallel))
  try:
    while pending or running:
      while pending and free_slots:
        job = pending.pop(0)
        slot = free_slots.pop(0)
        os.makedirs(job.model_dir, exist_ok=True)
        try:
          held = experiment_runs.read_history(job.model_dir) or []
        except experiment_runs.RunError:
          held = []
        command = job.command(extra_args)
        log = open(os.path.join(job.model_dir, LOG_FILE), "a")
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL,
                                   env=_child_env(slot, parallel, gpus))
        where = f" on GPU {gpus[slot % len(gpus)]}" if gpus else ""
        print(f"start {job.label}{where}: log in {log.name}", flush=True)
        running.append(_Running(job, process, log, slot,
                                max((h["epoch"] for h in held), default=0)))
      time.sleep(1.0)
      for run in list(running):
        run.report_new_epochs()
        code = run.process.poll()
        if code is None:
          continue
        running.remove(run)
        run.log.close()
        free_slots.append(run.slot)
        took = duration(time.time() - run.start)
        if code == 0:
          print(f"finished {run.job.label} in {took}: {final_line(run.job)}", flush=True)
          continue
        tail = _tail(run.log.name)
        print(f"FAILED {run.job.label} (exit code {code}) after {took}; last lines of "
              f"{run.log.name}:", file=sys.stderr)
        for line in tail:
          print(f"  | {line}", file=sys.stderr)
        sys.stderr.flush()
        # The trainer's `error:` line says why; a hint may follow it.
        last = next((line for line in reversed(tail) if line.startswith("error:")),
                    next((line for line in reversed(tail) if line.strip()), ""))
        failures.append(f"{run.job.label}: exit code {code} ({last.strip()}); see "
                        f"{run.log.name}")
  except KeyboardInterrupt:
    # Each run saves a checkpoint and stops (the same command resumes it; one killed after
    # the 30 s below keeps its previous checkpoint). SIGINT, so that each says
    # "interrupted" as after a Ctrl-C. (A Ctrl-C in the terminal has reached them
    # already; a signal sent to this process alone has not.)
    for run in running:
      if run.process.poll() is None:
        run.process.send_signal(signal.SIGINT)
    for run in running:
      try:
        run.process.wait(timeout=30)
      except subprocess.TimeoutExpired:
        run.process.kill()
      run.log.close()
      failures.append(f"{run.job.label}: interrupted; rerun the same command to resume it")
    failures += [f"{job.label}: not started (interrupted)" for job in pending]
    print("interrupted: rerun the same command to resume the study", file=sys.stderr)
    interrupted = True
  return failures, interrupted
