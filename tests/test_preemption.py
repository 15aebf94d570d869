"""Preemption of a multi-worker run: a SIGTERM to one worker makes every worker save at one
agreed step and exit 143; rerunning resumes there and ends as an uninterrupted run."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, free_ports

# Its test runs a cluster of trainer processes and signals one of them.
pytestmark = pytest.mark.process

TIMEOUT = 240


def start_workers(model_dir: pathlib.Path, log_dir: pathlib.Path, name: str
                  ) -> list[tuple[subprocess.Popen, pathlib.Path]]:
  """Two workers of one cluster on 127.0.0.1: 60 deterministic steps, no periodic save."""
  ports = free_ports(2)
  log_dir.mkdir(parents=True, exist_ok=True)
  workers = []
  for index in range(2):
    tf_config = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                            "task": {"type": "worker", "index": index}})
    log = log_dir / f"{name}-worker{index}.err"
    with open(log, "w") as stderr:
      process = subprocess.Popen(
          [sys.executable, "-m", "trainer.main", "--strategy=multi_worker", "--depth=8",
           "--data_source=synthetic", "--synthetic_examples=50000,60", "--deterministic",
           f"--model_dir={model_dir}",
           "--epochs=1", "--steps_per_epoch=60", "--global_batch_size=8", "--eval_steps=2",
           "--log_every_steps=5", "--checkpoint_every_steps=100000",
           "--peer_timeout_seconds=60"],
          cwd=REPO, env={**os.environ, "TF_CONFIG": tf_config}, stdout=stderr,
          stderr=subprocess.STDOUT, start_new_session=True)
    workers.append((process, log))
  return workers


def finish(workers) -> list[str]:
  deadline = time.time() + TIMEOUT
  for process, _ in workers:
    try:
      process.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for p, _ in workers:
        os.killpg(p.pid, signal.SIGKILL)
      raise
  return [log.read_text() for _, log in workers]


def test_sigterm_to_one_worker_saves_every_worker_at_one_step_and_the_rerun_resumes(
    tmp_path):
  reference = finish(start_workers(tmp_path / "reference", tmp_path / "logs", "reference"))
  assert "done:" in reference[0], reference[0][-3000:]
  model_dir = tmp_path / "run"
  workers = start_workers(model_dir, tmp_path / "logs", "preempted")
  deadline = time.time() + TIMEOUT
  while not re.search(r"step (1[05]|[2-5]\d)/60", workers[1][1].read_text()):
    assert time.time() < deadline and all(p.poll() is None for p, _ in workers), (
        workers[0][1].read_text()[-3000:] + workers[1][1].read_text()[-3000:])
    time.sleep(0.2)
  workers[1][0].send_signal(signal.SIGTERM)  # The non-chief only.
  stderr = finish(workers)
  assert [p.returncode for p, _ in workers] == [143, 143], stderr[0][-2000:] + stderr[1][-2000:]
  saved = sorted((model_dir / "checkpoints").glob("ckpt-*.index"))
  assert len(saved) == 1, saved  # The preemption save is the only checkpoint.
  step = int(saved[0].name[len("ckpt-"):-len(".index")])
  assert 10 <= step < 60
  for text in stderr:
    assert f"error: terminated (SIGTERM); saved {model_dir}/checkpoints/ckpt-{step} " in text
  assert "SIGTERM received: stopping" in stderr[1]

  rerun = finish(start_workers(model_dir, tmp_path / "logs", "rerun"))
  for text in rerun:
    assert f"resumed from {model_dir}/checkpoints/ckpt-{step} at step {step}" in text, (
        text[-3000:])
    assert "done:" in text
  metrics = json.loads((model_dir / "metrics.json").read_text())
  expected = json.loads((tmp_path / "reference" / "metrics.json").read_text())
  assert metrics["resumed_from_step"] == step and metrics["steps"] == 60
  # Equal within rounding, not bit for bit: the preemption save averaged the replicas'
  # batch-norm statistics mid-run, the uninterrupted run only at its end; the same mean
  # by linearity, rounded differently (measured: 1.0e-7 relative on the test loss, in 4
  # of 5 runs; an exact comparison failed on them). A resume at a wrong step or with other
  # weights moves the loss by 1e-3 or more.
  assert metrics["test_accuracy"] == expected["test_accuracy"]
  assert abs(metrics["test_loss"] - expected["test_loss"]) <= 1e-5 * expected["test_loss"]
