"""Shared test set-up: two logical CPU devices (for MirroredStrategy tests), quiet TF logs,
the helpers several test files use (import them: `from conftest import run_main`), and the
`process` marker with the guard that holds it (see "The process marker" below)."""

import _posixsubprocess
import contextlib
import functools
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time

import numpy as np
import pytest

from trainer import cli

cli.import_tensorflow()  # Without its C++ start-up lines, in each of pytest-xdist's workers.
import tensorflow as tf  # noqa: E402

# Must happen before TensorFlow initialises its devices, hence at import time.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * 2)

REPO = pathlib.Path(__file__).resolve().parents[1]
# Synthetic splits of 256 training and 60 test images (a partial last batch of 16): the
# final evaluation covers the whole test split, and CIFAR-10's 10,000 cost a tiny run 2 s.
SMALL_SYNTHETIC_EXAMPLES = (256, 60)
SMALL_SYNTHETIC = f"--synthetic_examples={','.join(map(str, SMALL_SYNTHETIC_EXAMPLES))}"
# depth 8 (CIFAR family, n=1) on synthetic data: big enough to checkpoint, fast to run.
# 4 steps an epoch, 32 of the 60 test images each epoch.
TINY_FLAGS = ["--depth=8", "--data_source=synthetic", SMALL_SYNTHETIC, "--global_batch_size=16",
              "--steps_per_epoch=4", "--eval_steps=2", "--log_every_steps=1"]
CLASSES = [f"class{i}" for i in range(10)]


# The process marker: `make test-fast` runs `-m "not process"`.
#
# A test marked `process` starts the trainer, a script or another program as a process
# (signals, exit codes, workers, Slurm, documented commands). Any other test that starts
# one fails with PROCESS_MESSAGE, so the fast lane cannot quietly grow slow again: while a
# test runs (set-up, call and tear-down: its fixtures included), every way CPython starts a
# process is wrapped. Only processes the project's own code asks for count (the nearest
# caller outside the standard library is a file of this repo): a library that shells out on
# its own (matplotlib's font cache runs fc-list on a fresh machine, ctypes.util runs
# ldconfig) would otherwise fail an unmarked test on one machine and not on another.
# pytest-xdist starts its workers before any test, outside the guard.

PROCESS_MESSAGE = "this test starts a process: mark it @pytest.mark.process"
_STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
_VENV = pathlib.Path(sys.prefix)  # the venv's site-packages may lie inside the repo
_current_item: pytest.Item | None = None
_fixtures_being_set_up: list = []
_PROCESS_FIXTURES: set = set()  # FixtureDefs that started a process while being set up
_VIOLATIONS = pytest.StashKey[list[str]]()
_GUARD_CODES: set = set()


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "process: starts the trainer, a script or another program as a process "
      "(signals, exit codes, workers, Slurm, documented commands); make test-fast "
      "leaves these out, and tests/conftest.py fails any other test that starts one")


def _project_caller() -> str | None:
  """"file:line in function" of the project code that asked for the process being started,
  or None when a library (not the standard library) asked for it on its own."""
  frame = sys._getframe(2)
  while frame is not None:
    name = frame.f_code.co_filename
    path = pathlib.Path(name)
    library = "site-packages" in path.parts or path.is_relative_to(_VENV)
    # "<frozen os>" and the like are the standard library's too.
    standard = name.startswith("<") or path.is_relative_to(_STDLIB) and not library
    if frame.f_code not in _GUARD_CODES and not standard:
      if path.is_relative_to(REPO) and not library:
        return f"{path.relative_to(REPO)}:{frame.f_lineno} in {frame.f_code.co_name}"
      return None
    frame = frame.f_back
  return None


def _guarded(start, describe):
  """`start` (a function that starts a process), failing an unmarked test that calls it."""
  @functools.wraps(start)
  def guarded(*args, **kwargs):
    item = _current_item
    caller = _project_caller() if item is not None else None
    if caller is not None:
      # A fixture being set up now starts a process: each test that uses it is a process
      # test, including those that find it already set up (module and session scope).
      _PROCESS_FIXTURES.update(_fixtures_being_set_up)
      if item.get_closest_marker("process") is None:
        message = f"{PROCESS_MESSAGE} (started {describe(args, kwargs)} from {caller})"
        # Recorded too, so that the test fails even if the code under test swallows the
        # error or starts the process in a thread of its own.
        item.stash.setdefault(_VIOLATIONS, []).append(message)
        pytest.fail(message, pytrace=False)
    return start(*args, **kwargs)

  _GUARD_CODES.add(guarded.__code__)
  return guarded


def _command(args, kwargs) -> str:
  argv = args[1] if len(args) > 1 else kwargs.get("args")
  words = [str(argv)] if isinstance(argv, (str, bytes, os.PathLike)) else list(map(str, argv))
  # One line, however long a `python -c` script it carries.
  command = " ".join(" ".join(words).split())
  return command if len(command) <= 160 else command[:157] + "..."


def _install_process_guard() -> None:
  """Wraps the process starters: Popen (subprocess.run, check_output, os.popen), fork
  (multiprocessing's fork start, os.spawn*, pty), posix_spawn, system, and fork_exec
  (multiprocessing's spawn and forkserver starts)."""
  subprocess.Popen._execute_child = _guarded(subprocess.Popen._execute_child, _command)
  for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
    setattr(os, name, _guarded(getattr(os, name), lambda args, kwargs, name=name:
                               f"os.{name}{tuple(map(str, args))[:2]}"))
  _posixsubprocess.fork_exec = _guarded(_posixsubprocess.fork_exec,
                                        lambda args, kwargs: "_posixsubprocess.fork_exec")


_install_process_guard()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item):
  global _current_item
  _current_item = item
  try:
    yield
  finally:
    _current_item = None


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef):
  _fixtures_being_set_up.append(fixturedef)
  try:
    yield
  finally:
    _fixtures_being_set_up.pop()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
  """Fails an unmarked test that uses a fixture which started a process for an earlier test
  (it does not start one again here)."""
  if item.get_closest_marker("process") is not None:
    return
  # name2fixturedefs: the fixture definitions this test resolved, the last one in use
  # (pytest's own attribute; only test functions have it).
  fixture_info = getattr(item, "_fixtureinfo", None)
  for name, definitions in (fixture_info.name2fixturedefs if fixture_info else {}).items():
    if definitions and definitions[-1] in _PROCESS_FIXTURES:
      message = f"{PROCESS_MESSAGE} (its fixture {name!r} starts one)"
      item.stash.setdefault(_VIOLATIONS, []).append(message)
      pytest.fail(message, pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  # Each phase's report takes the violations of its own phase only.
  violations = item.stash.get(_VIOLATIONS, [])
  item.stash[_VIOLATIONS] = []
  if violations and report.passed:
    report.outcome = "failed"
    report.longrepr = "\n".join(violations)


# Devices.

def two_cpus() -> list[str]:
  """The two logical CPUs made above."""
  devices = [d.name for d in tf.config.list_logical_devices("CPU")]
  assert len(devices) == 2, "tests/conftest.py should have made two logical CPUs"
  return devices


def mirrored_on_two_cpus() -> tf.distribute.MirroredStrategy:
  """A MirroredStrategy that leaves no collective behind for later tests.

  Its default cross-device ops on CPUs are collectives whose keys restart at 1 in every
  strategy object: a later test's collective of another shape then fails on the cached
  one ("Shape mismatch in the collective instance 100").
  """
  return tf.distribute.MirroredStrategy(two_cpus(),
                                        cross_device_ops=tf.distribute.ReductionToOneDevice())


@functools.cache
def cpu_runs(precision: str) -> bool:
  """Whether this CPU runs the convolutions of `precision` (oneDNN's half-precision ones
  need AVX-512 on most CPUs; which run differs between CPUs); the trainer refuses a
  precision where they do not."""
  from trainer import distribute, errors
  try:
    distribute.check_precision_runs(precision, tf.distribute.get_strategy())
  except errors.DistributionError:
    return False
  return True


def skip_unless_cpu_runs(precision: str) -> None:
  """Skips a test that needs `precision`'s kernels where this CPU lacks them (e.g. under
  ONEDNN_MAX_CPU_ISA=AVX2); the refusal itself is test_distribution's."""
  if not cpu_runs(precision):
    pytest.skip(f"this CPU cannot run {precision} convolutions (the trainer refuses it here)")


# The entrypoint, as a real process.

def run_main(*args: str, timeout: float = 300, cwd: pathlib.Path = REPO,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  """Runs `python -m trainer.main ARGS` (from the repo root unless `cwd`; `env` added to
  this environment) to the end; output captured."""
  return subprocess.run([sys.executable, "-m", "trainer.main", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=timeout,
                        env=None if env is None else {**os.environ, **env})


def run_and_kill(args: list[str], pattern: str, timeout: float = 300) -> None:
  """Starts the trainer and SIGKILLs it as soon as a stderr line contains `pattern`."""
  process = subprocess.Popen([sys.executable, "-m", "trainer.main", *args], cwd=REPO,
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
  deadline = time.time() + timeout
  try:
    for line in process.stderr:
      if pattern in line:
        process.send_signal(signal.SIGKILL)
        break
      assert time.time() < deadline, "timed out waiting for " + pattern
    else:
      pytest.fail(f"the run ended before printing {pattern!r}")
  finally:
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> pathlib.Path:
  """The model dir of a finished tiny run: TINY_FLAGS for 2 epochs (8 steps, ckpt-8).

  For tests that only read it (evaluating or exporting it may add files; never train on).
  """
  model_dir = tmp_path_factory.mktemp("finished") / "run"
  result = run_main(*TINY_FLAGS, "--epochs=2", f"--model_dir={model_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  return model_dir


# Several processes at once (workers of one cluster, runs side by side).

def free_ports(count: int) -> list[int]:
  """Ports nobody listens on now (the OS hands out each once; a tiny race remains)."""
  with contextlib.ExitStack() as stack:
    sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]


def tf_config(ports: list[int], index: int) -> str:
  return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                     "task": {"type": "worker", "index": index}})


class Run:
  """A subprocess whose output goes to files (no pipe to fill up while others are polled)."""

  def __init__(self, args: list[str], log_dir: pathlib.Path, name: str,
               env: dict | None = None, program: list[str] | None = None):
    log_dir.mkdir(parents=True, exist_ok=True)
    self.name = name
    self.stdout_path, self.stderr_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
    command = [sys.executable, *(program or ["-m", "trainer.main"]), *args]
    with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
      # Its own session, so that kill() reaches its children (the peer watchdog) too.
      self.process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **(env or {})},
                                      stdout=stdout, stderr=stderr, start_new_session=True)
    self.started, self.seconds = time.time(), None

  @property
  def pid(self) -> int:
    return self.process.pid

  @property
  def returncode(self) -> int | None:
    return self.process.returncode

  @property
  def stdout(self) -> str:
    return self.stdout_path.read_text()

  @property
  def stderr(self) -> str:
    return self.stderr_path.read_text()

  def poll(self) -> bool:
    """True once the process has ended (and records how long it ran)."""
    if self.process.poll() is not None and self.seconds is None:
      self.seconds = time.time() - self.started
    return self.seconds is not None

  def kill(self) -> None:
    """SIGKILL: a worker blocked joining a cluster ignores SIGTERM (TensorFlow takes it)."""
    if self.process.poll() is None:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(self.process.pid, signal.SIGKILL)
    self.process.wait()


def wait_for(run: Run, pattern: str, timeout: float = 300) -> None:
  """Until the run's stderr holds `pattern` (a regex); fails if it ends first."""
  deadline = time.time() + timeout
  while not re.search(pattern, run.stderr):
    assert not run.poll(), f"{run.name} ended before {pattern!r}:\n{run.stderr[-3000:]}"
    assert time.time() < deadline, f"{run.name}: no {pattern!r} within {timeout} s"
    time.sleep(0.02)


def finish(runs: list[Run], timeout: float) -> None:
  """Waits for every run; on the deadline kills them all and fails. Always reaps them."""
  deadline = time.time() + timeout
  try:
    while not all(run.poll() for run in runs):
      if time.time() > deadline:
        late = [run.name for run in runs if not run.poll()]
        pytest.fail(f"{', '.join(late)} did not finish within {timeout} s")
      time.sleep(0.05)
  finally:
    for run in runs:
      run.kill()


# Image folders (--data_source=folder).

def write_image(path: pathlib.Path, image: np.ndarray) -> None:
  """Writes a PNG or JPEG (by the file's suffix), making its folder."""
  path.parent.mkdir(parents=True, exist_ok=True)
  encode = tf.io.encode_png if path.suffix == ".png" else tf.io.encode_jpeg
  path.write_bytes(encode(image).numpy())


def make_folder(root: pathlib.Path, classes=CLASSES, train: int = 4, test: int = 2,
                suffix: str = ".png", learnable: bool = False) -> pathlib.Path:
  """root/{train,test}/<class>/<i><suffix>: `train` and `test` 32x32 images per class.

  Random pixels, or with `learnable` one colour per class plus noise (a ResNet-8 learns it
  in a few steps). Seeded: the same arguments make the same images. A split with 0 images
  gets no folder.
  """
  rng = np.random.default_rng(0)
  colours = rng.integers(0, 256, (len(classes), 3)) if learnable else None
  for split, count in (("train", train), ("test", test)):
    for label, name in enumerate(classes):
      for i in range(count):
        if learnable:
          image = np.clip(colours[label] + rng.normal(0, 20, (32, 32, 3)), 0, 255)
          image = image.astype(np.uint8)
        else:
          image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        write_image(root / split / name / f"{i}{suffix}", image)
  return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
  """image_folder(train=4, test=2, learnable=False) -> the root of a 10-class PNG folder
  dataset (see make_folder), made once per session for each set of arguments."""
  made = {}

  def get(train: int = 4, test: int = 2, learnable: bool = False) -> pathlib.Path:
    key = (train, test, learnable)
    if key not in made:
      made[key] = make_folder(tmp_path_factory.mktemp("images"), train=train, test=test,
                              learnable=learnable)
    return made[key]

  return get


# What a run wrote.

def event_tags(log_dir: pathlib.Path) -> set[str]:
  """Every summary tag written under a TensorBoard log dir."""
  tags = set()
  for path in log_dir.glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      tags.update(value.tag for value in event.summary.value)
  return tags


def logged(log_dir: pathlib.Path, tag: str) -> dict[int, float]:
  """The scalar a TensorBoard log dir holds for `tag`: {step: value}."""
  values = {}
  for path in sorted(log_dir.glob("events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.tag == tag:
          values[event.step] = float(tf.make_ndarray(value.tensor))
  return values


def checkpoint_weights(path: pathlib.Path | str) -> dict[str, np.ndarray]:
  """The model's variables in a checkpoint (a prefix, or a dir: its latest), keyed by
  variable path ("stage1_block1_conv1/kernel") as `variable.path` names them."""
  reader = tf.train.load_checkpoint(str(path))
  weights = {}
  for key in reader.get_variable_to_shape_map():
    if key.startswith("model/"):
      name = key[len("model/"):].removesuffix("/.ATTRIBUTES/VARIABLE_VALUE")
      # tf.train.Checkpoint escapes "/" in a key as ".S" and "." as "..".
      name = re.sub(r"\.(.)", lambda m: "/" if m.group(1) == "S" else m.group(1), name)
      weights[name] = reader.get_tensor(key)
  return weights


def checkpoint_tensors(path: pathlib.Path | str) -> dict[str, np.ndarray]:
  """Every float tensor of a checkpoint (a dir: its latest) of model, optimizer, average,
  in float64."""
  reader = tf.train.load_checkpoint(str(path))
  return {key: reader.get_tensor(key).astype(np.float64)
          for key, dtype in reader.get_variable_to_dtype_map().items()
          if key.split("/")[0] in ("model", "optimizer", "ema") and dtype.is_floating}


def tensor_group(key: str) -> str:
  """What a checkpoint tensor is: weights, batch-norm statistics, optimizer slots or
  moving average."""
  kind = key.split("/")[0]
  if kind == "model":
    return "batch-norm statistics" if "moving_" in key else "weights"
  return {"optimizer": "optimizer slots", "ema": "moving average"}[kind]


def change_errors(reference: dict, other: dict, initial: dict) -> dict[str, float]:
  """||other - reference|| / ||reference - initial|| over each tensor_group: how far two
  runs from one initial state end apart, relative to how far they moved (the loss scale,
  which no initial state holds, is left out)."""
  squares = {}
  for key, value in reference.items():
    if key in initial:
      error, change = squares.setdefault(tensor_group(key), [0.0, 0.0])
      squares[tensor_group(key)] = [error + ((other[key] - value) ** 2).sum(),
                                    change + ((value - initial[key]) ** 2).sum()]
  return {name: float(np.sqrt(e / c)) for name, (e, c) in squares.items() if c > 0}


# N replicas against one device: how far the two may end apart, as change_errors measures
# it. Measured on this trainer (AMD EPYC, AVX2, 2026-12-03), rounding alone gives at most
# 1.7e-3 in float32 after 6 steps (4e-4 for fast and he2016), 1.7e-2 in mixed_float16 and
# 4.6e-2 in mixed_bfloat16 (half-precision products round at 1e-3 and 8e-3); these are
# about 6x that. A broken rule moves the change by its own size: clipping each replica's
# share (the code before 2026-12-03) gave 0.47 for blog on 2 replicas; other data or
# augmentation changes every update. docs/distribution.md and docs/invariants.md quote them.
REPLICA_TOLERANCE = {"float32": 1e-2, "mixed_float16": 1e-1, "mixed_bfloat16": 2e-1}


# What a run trained on (trainer.main.RECORD_BATCHES_VARIABLE).

def recorded_batches(model_dir: pathlib.Path) -> dict[int, list[int]]:
  """Each step's global batch as the run recorded it in batches.jsonl, as example ids: a
  step's last record (a resumed run records again the steps it trains again)."""
  recorded = {}
  for line in (model_dir / "batches.jsonl").read_text().splitlines():
    record = json.loads(line)
    recorded[record["step"]] = record["ids"]
  return recorded


def planned_batches(model_dir: pathlib.Path, steps: int) -> list[list[int]]:
  """The global batches of steps 1..steps of the run in model_dir as its plan makes them,
  anew here, by one input pipeline from the run's data and data seed (its config.json)."""
  from input_pipeline import pipeline
  from trainer import config as config_lib, data
  settings = json.loads((model_dir / "config.json").read_text())
  splits = data.load(config_lib.Config(
      data_source=settings["data_source"], data_dir=settings["data_dir"],
      seed=settings["seed"], validation_split=settings["validation_split"]))
  batches = pipeline.train_pipeline(
      splits.train.as_dataset(), per_replica_batch_size=settings["global_batch_size"],
      seed=settings["data_seed_resolved"], with_ids=True)
  return [ids.numpy().tolist() for _, _, ids in batches.take(steps)]


# The session's summary.

def pytest_terminal_summary(terminalreporter):
  """The combination suite's table of cases (tests/test_combinations.py), each with its
  outcome, whenever any of its cases ran."""
  outcomes = {}
  for reports in terminalreporter.stats.values():
    for report in reports:
      properties = dict(getattr(report, "user_properties", ()) or ())
      if "case" in properties and getattr(report, "when", None) == "call":
        outcomes[properties["case"]] = properties.get("outcome", report.outcome)
  if not outcomes:
    return
  import test_combinations
  terminalreporter.section("combination cases (tests/test_combinations.py)")
  header, *rows = test_combinations.table()
  terminalreporter.write_line(f"{header}  outcome")
  for row in rows:
    case = row.split(" ", 1)[0]
    terminalreporter.write_line(f"{row}  {outcomes.get(case, 'not run')}")
