"""Starts N local workers of one multi-worker training run, to try --strategy=multi_worker
on one machine: each gets a TF_CONFIG naming free 127.0.0.1 ports and its own task index.

  python scripts/launch_local_workers.py --num_workers=2 -- --depth=20 \
      --data_source=synthetic --epochs=1 --steps_per_epoch=20 --model_dir=runs/two_workers

Everything after `--` goes to every `python -m trainer.main --strategy=multi_worker`.
Worker 0 is the chief: it alone writes --model_dir. Each output line is prefixed with
[worker i]. When a worker fails, or on Ctrl-C, the others are stopped (SIGINT, then
SIGKILL: a worker ignores SIGTERM, which TensorFlow takes as a preemption notice). The
exit status is 0 when every worker succeeded, else that of the first one that failed.
On real machines, set TF_CONFIG yourself (see docs/distribution.md).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)  # `python scripts/X.py` puts scripts/, not the repo, on the path.

from trainer import cli  # noqa: E402


flags.DEFINE_integer("num_workers", 2, "Workers to start.", lower_bound=1)
flags.DEFINE_list("ports", None, "Their ports on 127.0.0.1, one per worker (default: free "
                  "ports chosen now).")
flags.DEFINE_float("stop_grace_seconds", 10.0, "After SIGINT, how long the workers get to "
                   "exit before SIGKILL.", lower_bound=0)
FLAGS = flags.FLAGS


def free_ports(count: int) -> list[int]:
  """Ports nobody listens on now (each distinct; another program could still take one)."""
  sockets = [socket.socket() for _ in range(count)]
  try:
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def tf_configs(ports: list[int]) -> list[str]:
  """The TF_CONFIG of each worker: the same cluster, each its own index."""
  cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
  return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
          for i in range(len(ports))]


class Worker:
  """One trainer process; a thread copies its output to ours, line by line, prefixed."""

  def __init__(self, index: int, tf_config: str, trainer_args: list[str],
               output_lock: threading.Lock):
    self.index = index
    command = [sys.executable, "-m", "trainer.main", "--strategy=multi_worker",
               *trainer_args]
    # Its own session: Ctrl-C reaches the launcher only, which then stops every worker.
    self.process = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, "TF_CONFIG": tf_config},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        start_new_session=True)
    self._lock = output_lock
    self._reader = threading.Thread(target=self._copy_output, daemon=True)
    self._reader.start()

  def _copy_output(self) -> None:
    for line in self.process.stdout:
      with self._lock:
        sys.stdout.write(f"[worker {self.index}] {line}")
        sys.stdout.flush()

  def signal(self, signum: int) -> None:
    if self.process.poll() is None:
      try:
        os.killpg(self.process.pid, signum)
      except ProcessLookupError:
        pass

  def join_output(self) -> None:
    self._reader.join(timeout=5)


def stop_all(workers: list[Worker], grace_seconds: float) -> None:
  """SIGINT (the trainer stops between steps), then SIGKILL for those still running."""
  for worker in workers:
    worker.signal(signal.SIGINT)
  deadline = time.time() + grace_seconds
  while time.time() < deadline and any(w.process.poll() is None for w in workers):
    time.sleep(0.1)
  for worker in workers:
    worker.signal(signal.SIGKILL)
    worker.process.wait()


def _raise_keyboard_interrupt(signum, frame):
  raise KeyboardInterrupt


def launch(num_workers: int, trainer_args: list[str], ports: list[int] | None = None,
           grace_seconds: float = 10.0) -> int:
  """Runs the workers to the end.

  Args:
    num_workers: how many.
    trainer_args: flags for trainer.main (not --strategy).
    ports: one per worker; None: free ports.
    grace_seconds: how long stopped workers get before SIGKILL.
  Returns:
    0 if all succeeded, else the exit status of the first that failed (1 if killed).
  """
  ports = ports or free_ports(num_workers)
  lock = threading.Lock()
  workers = []

  def say(message: str) -> None:
    with lock:
      print(f"[launcher] {message}", flush=True)

  # A SIGTERM to the launcher (e.g. from a job scheduler) stops the workers too.
  signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
  try:
    for index, tf_config in enumerate(tf_configs(ports)):
      workers.append(Worker(index, tf_config, trainer_args, lock))
      say(f"worker {index}: pid {workers[-1].process.pid}, TF_CONFIG='{tf_config}'")
    running = list(workers)
    while running:
      for worker in list(running):
        code = worker.process.poll()
        if code is None:
          continue
        running.remove(worker)
        worker.join_output()
        if code != 0:
          say(f"worker {worker.index} failed (exit status {code}); stopping the others")
          stop_all(running, grace_seconds)
          for other in running:
            other.join_output()
          return code if code > 0 else 1
        say(f"worker {worker.index} finished")
      time.sleep(0.2)
    return 0
  except KeyboardInterrupt:
    say("interrupted; stopping the workers")
    stop_all(workers, grace_seconds)
    return 130
  finally:
    stop_all(workers, 0)  # Nothing outlives the launcher, whatever happened.


def _ports(listed: list[str] | None, workers: int) -> list[int] | None:
  """--ports as port numbers, one per worker, distinct; None for free ports; else exit 2."""
  if not listed:
    return None
  if len(listed) != workers or not all(p.isdigit() and 0 < int(p) < 65536 for p in listed):
    cli.fail(f"--ports needs {workers} port numbers (1-65535), got {','.join(listed)}")
  if len(set(map(int, listed))) != workers:
    cli.fail(f"--ports lists a port twice: {','.join(listed)}")
  return [int(p) for p in listed]


def main(argv: list[str]) -> None:
  trainer_args = argv[1:]
  if any(arg.startswith("--strategy") for arg in trainer_args):
    cli.fail("the launcher sets --strategy=multi_worker; leave it out")
  ports = _ports(FLAGS.ports, FLAGS.num_workers)
  sys.exit(launch(FLAGS.num_workers, trainer_args, ports, FLAGS.stop_grace_seconds))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.script_parser)
