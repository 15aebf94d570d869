"""scripts/slurm/train.sbatch on a real one-node Slurm (scripts/slurm/local_cluster.sh):
each way Slurm stops a job saves one checkpoint at one step on both tasks, and the
resubmission or the automatic requeue resumes there; failures are requeued within limits."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

# Every test submits jobs to a real Slurm cluster (sbatch, scancel, the trainer).
pytestmark = pytest.mark.process

REPO = pathlib.Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "scripts" / "slurm" / "local_cluster.sh"
SBATCH_FILE = REPO / "scripts" / "slurm" / "train.sbatch"
PACKAGES = "munge slurmctld slurmd slurm-client"
# Long enough that no stop finds the run finished (3000 steps; the stops come within its
# first seconds of training); no periodic save, so each stop's checkpoint is the only one.
TRAIN = ["--depth=8", "--data_source=synthetic", "--synthetic_examples=50000,60",
         "--deterministic", "--global_batch_size=8",
         "--steps_per_epoch=3000", "--epochs=1", "--eval_steps=2", "--log_every_steps=5",
         "--checkpoint_every_steps=100000", "--peer_timeout_seconds=60"]
# Two trainers importing TensorFlow on two shared cores take 25-40 s to reach step 5.
START_TIMEOUT = 240
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
  """The environment that reaches the local cluster (started here if it is not up)."""
  missing = [p for p in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(p)]
  if missing:
    pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): "
                f"apt-get install {PACKAGES} (.ci/run does)")
  if os.geteuid() != 0:
    pytest.skip("the local Slurm cluster needs root (slurmd runs jobs as their users)")
  started = subprocess.run([str(CLUSTER_SCRIPT)], capture_output=True, text=True,
                           timeout=120)
  assert started.returncode == 0, started.stderr
  conf = re.search(r"export SLURM_CONF=(\S+)", started.stdout).group(1)
  env = {name: value for name, value in os.environ.items()
         if not name.startswith("SLURM") and name != "TF_CONFIG"}
  env.update(SLURM_CONF=conf, PYTHON=sys.executable)
  # Jobs a failed earlier run left behind would hold the node's CPUs.
  subprocess.run(["scancel", "--name=resnet-cifar-test"], env=env, check=False)
  deadline = time.time() + 60
  while slurm(env, "squeue", "-h", "-n", "resnet-cifar-test").strip():
    assert time.time() < deadline, "old test jobs did not leave the local cluster"
    time.sleep(0.5)
  return env


def slurm(env: dict[str, str], *command: str) -> str:
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
  return result.stdout


class Job:
  """One sbatch submission of train.sbatch and the file its attempts append to."""

  def __init__(self, env: dict[str, str], out: pathlib.Path, trainer_args: list[str],
               sbatch_args: tuple[str, ...] = (), extra_env: dict[str, str] | None = None):
    self.env, self.out = env, out
    self.id = slurm({**env, **(extra_env or {})}, "sbatch", "--parsable",
                    "--job-name=resnet-cifar-test", "--ntasks=2", f"--output={out}",
                    *sbatch_args, str(SBATCH_FILE), *trainer_args).strip().split(";")[0]

  @property
  def text(self) -> str:
    return self.out.read_text() if self.out.exists() else ""

  def info(self) -> dict[str, str]:
    """scontrol's fields of the job (JobState, Restarts, ExitCode, ...)."""
    line = slurm(self.env, "scontrol", "-o", "show", "job", self.id)
    return dict(re.findall(r"(\w+)=(\S*)", line))

  def attempt(self, restart: int) -> str:
    """The output of one attempt (0: the first run, 1: after the first requeue, ...)."""
    parts = re.split(r"(?m)^train\.sbatch: job \d+, restart (\d+),", self.text)
    texts = dict(zip(parts[1::2], parts[2::2]))
    return texts.get(str(restart), "")

  def wait_for(self, pattern: str, restart: int = 0, count: int = 1,
               timeout: float = START_TIMEOUT) -> None:
    """Waits until attempt `restart` printed `pattern` (a regex) `count` times."""
    deadline = time.time() + timeout
    while len(re.findall(pattern, self.attempt(restart))) < count:
      state = self.info()["JobState"]
      assert state not in FINAL_STATES, f"job ended {state} before {pattern!r}:\n{self.tail}"
      assert time.time() < deadline, f"no {pattern!r} within {timeout} s:\n{self.tail}"
      time.sleep(0.5)

  def wait_training(self, restart: int = 0) -> None:
    self.wait_for(r"step [1-9]\d*/3000", restart)

  def wait_end(self, timeout: float = 120) -> dict[str, str]:
    deadline = time.time() + timeout
    while (info := self.info())["JobState"] not in FINAL_STATES:
      assert time.time() < deadline, f"job still {info['JobState']} after {timeout} s:\n" + (
          self.tail)
      time.sleep(0.5)
    return info

  def wait_requeued(self, timeout: float = 60) -> None:
    """Waits until the job has left its running attempt for a pending one."""
    deadline = time.time() + timeout
    while self.info()["JobState"] != "PENDING":
      assert time.time() < deadline, f"job {self.id} was not requeued:\n{self.tail}"
      time.sleep(0.5)

  def cancel(self) -> None:
    subprocess.run(["scancel", self.id], env=self.env, check=False)
    self.wait_end()

  @property
  def tail(self) -> str:
    return self.text[-4000:]


def task_exit_codes(text: str) -> dict[int, int]:
  """{task: exit code} from srun's report (`tasks 0-1: Exited with exit code 143`)."""
  codes = {}
  for tasks, code in re.findall(r"srun: error: \S+: tasks? ([\d,-]+): Exited with exit "
                                r"code (\d+)", text):
    for part in tasks.split(","):
      first, _, last = part.partition("-")
      for task in range(int(first), int(last or first) + 1):
        codes[task] = int(code)
  return codes


def assert_saved_once(model_dir: pathlib.Path, text: str) -> int:
  """Both tasks stopped with 143 after saving the one checkpoint at one step; its step."""
  saved = sorted((model_dir / "checkpoints").glob("ckpt-*.index"))
  assert len(saved) == 1, (saved, text[-3000:])
  step = int(saved[0].name[len("ckpt-"):-len(".index")])
  assert step > 0
  line = f"error: terminated (SIGTERM); saved {model_dir}/checkpoints/ckpt-{step} (step {step})"
  assert text.count(line) == 2, text[-3000:]  # One per task: the same step on both.
  assert task_exit_codes(text) == {0: 143, 1: 143}, text[-3000:]
  assert "train.sbatch: the trainer exited with status 143" in text
  return step


def assert_resumes(job: Job, model_dir: pathlib.Path, step: int, restart: int = 0) -> None:
  """Both tasks of the job's attempt `restart` resumed from ckpt-`step`; then cancels it."""
  job.wait_for(re.escape(f"resumed from {model_dir}/checkpoints/ckpt-{step} at step {step} "),
               restart, count=2)
  job.cancel()


def submit(slurm_env, tmp_path, name: str, *sbatch_args: str, **extra_env: str) -> Job:
  return Job(slurm_env, tmp_path / f"{name}.out", [f"--model_dir={tmp_path / 'run'}", *TRAIN],
             sbatch_args, extra_env)


# The cluster.

def test_the_cluster_script_is_idempotent_and_reports_the_cluster_up(slurm_env):
  again = subprocess.run([str(CLUSTER_SCRIPT)], capture_output=True, text=True, timeout=60)
  assert again.returncode == 0, again.stderr
  assert "already up: node localhost" in again.stderr and "low*(up) high(up)" in again.stderr
  assert f"export SLURM_CONF={slurm_env['SLURM_CONF']}" in again.stdout
  config = slurm(slurm_env, "scontrol", "show", "config")
  assert re.search(r"SelectType\s+= select/cons_tres", config)
  assert re.search(r"KillWait\s+= 20 sec", config)


# Each way Slurm stops a job.

def test_scancel_saves_on_both_tasks_and_a_resubmission_resumes(slurm_env, tmp_path):
  job = submit(slurm_env, tmp_path, "first")
  job.wait_training()
  subprocess.run(["scancel", job.id], env=slurm_env, check=True)
  info = job.wait_end()
  assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), job.tail
  step = assert_saved_once(tmp_path / "run", job.text)

  assert_resumes(submit(slurm_env, tmp_path, "second"), tmp_path / "run", step)


def test_scancel_full_term_saves_on_both_tasks_and_a_resubmission_resumes(
    slurm_env, tmp_path):
  """SIGTERM to the batch shell and its process group too (an admin's, or a job's own
  --signal=B:TERM@N): the shell and srun must not take the tasks down with them."""
  job = submit(slurm_env, tmp_path, "first")
  job.wait_training()
  subprocess.run(["scancel", "--signal=TERM", "--full", job.id], env=slurm_env, check=True)
  info = job.wait_end()
  assert (info["JobState"], info["ExitCode"]) == ("FAILED", "143:0"), job.tail
  assert "train.sbatch: SIGTERM received: asking the tasks to save" in job.text
  assert "not requeued; resubmit the same command to resume" in job.text
  step = assert_saved_once(tmp_path / "run", job.text)

  assert_resumes(submit(slurm_env, tmp_path, "second"), tmp_path / "run", step)


def test_the_time_limit_signal_saves_and_the_job_requeues_itself_and_resumes(
    slurm_env, tmp_path):
  """--signal=TERM@100: SIGTERM to the tasks 100 s before the time limit. The limit is
  shortened once training runs (Slurm checks time limits every 30 s), so that the warning
  is due at once rather than during start-up."""
  job = submit(slurm_env, tmp_path, "job", "--time=10", "--signal=TERM@100")
  job.wait_training()
  slurm(slurm_env, "scontrol", "update", f"JobId={job.id}", "TimeLimit=2")
  job.wait_requeued()
  # The requeued attempt gets its time back, or its own warning would come during start-up.
  slurm(slurm_env, "scontrol", "update", f"JobId={job.id}", "TimeLimit=10")
  first = job.attempt(0)
  assert re.search(r"stopped \d+ s before the time limit: requeueing job \d+ \(restart 1 of "
                   r"at most 10\)", first), first[-3000:]
  step = assert_saved_once(tmp_path / "run", first)

  assert_resumes(job, tmp_path / "run", step, restart=1)
  assert job.info()["Restarts"] == "1"


def test_preemption_saves_and_the_job_requeues_itself_and_resumes(slurm_env, tmp_path):
  """A job of partition `high` needs a CPU of the running job in `low` (PreemptMode=REQUEUE,
  GraceTime=20): Slurm sends the tasks SIGTERM, they save and stop within the grace time."""
  job = submit(slurm_env, tmp_path, "job")
  job.wait_training()
  slurm(slurm_env, "sbatch", "--job-name=resnet-cifar-test", "--partition=high", "--ntasks=1",
        f"--output={tmp_path / 'high.out'}", "--wrap=sleep 1")
  job.wait_requeued()
  first = job.attempt(0)
  assert "train.sbatch: preempted: requeueing job" in first, first[-3000:]
  step = assert_saved_once(tmp_path / "run", first)

  assert_resumes(job, tmp_path / "run", step, restart=1)


# What is never or no longer requeued.

def test_a_user_error_exit_2_is_never_requeued(slurm_env, tmp_path):
  job = Job(slurm_env, tmp_path / "job.out", ["--depth=7", f"--model_dir={tmp_path / 'run'}"])
  info = job.wait_end()
  assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0")
  assert "error: --depth/--stem/--shortcut/--stage_*: unsupported depth 7" in job.text
  assert "a user error (exit 2, 'error: ...' above): never requeued" in job.text


def fake_trainer(tmp_path: pathlib.Path, saves: bool) -> str:
  """A stand-in for `python -m trainer.main` that fails at once (exit 1, as on a lost
  peer), after touching --model_dir's checkpoint state file when `saves` (progress)."""
  script = tmp_path / "fake_python"
  save = 'mkdir -p "$dir/checkpoints" && touch "$dir/checkpoints/checkpoint"\n' if saves else ""
  script.write_text("#!/bin/sh\n# Fails like a trainer whose peer was lost.\n"
                    'for arg; do case $arg in --model_dir=*) dir=${arg#--model_dir=};; esac; done\n'
                    f"{save}echo \"fake trainer failing\" >&2\nexit 1\n")
  script.chmod(0o755)
  return str(script)


def test_a_failing_run_is_requeued_until_the_requeue_limit(slurm_env, tmp_path):
  job = Job(slurm_env, tmp_path / "job.out", [f"--model_dir={tmp_path / 'run'}"],
            extra_env={"PYTHON": fake_trainer(tmp_path, saves=True),
                       "RESNET_CIFAR_MAX_REQUEUES": "1"})
  info = job.wait_end(timeout=120)
  assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "1:0", "1")
  assert "the run failed (exit 1): requeueing job" in job.attempt(0)
  assert ("the run failed (exit 1), but this job was already restarted 1 time(s) "
          "(RESNET_CIFAR_MAX_REQUEUES=1): not requeued") in job.attempt(1)
  assert job.text.count("fake trainer failing") == 4  # Two tasks, two attempts.


def test_a_run_failing_before_any_checkpoint_is_not_requeued(slurm_env, tmp_path):
  job = Job(slurm_env, tmp_path / "job.out", [f"--model_dir={tmp_path / 'run'}"],
            extra_env={"PYTHON": fake_trainer(tmp_path, saves=False)})
  info = job.wait_end()
  assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "1:0", "0")
  assert "saved no checkpoint since it started: not requeued" in job.text
