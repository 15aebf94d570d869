"""N replicas on M workers compute what one device computes: the same global batch gives
the same weights, optimizer slots, moving averages and logged metrics, up to float
rounding, for every recipe and precision (docs/distribution.md)."""

import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from conftest import (REPLICA_TOLERANCE, Run, change_errors, checkpoint_tensors, cpu_runs,
                      finish, free_ports, logged, skip_unless_cpu_runs, tf_config)

# Every test compares trainer runs, each a process of its own.
pytestmark = pytest.mark.process

TIMEOUT = 300
STEPS = 6
# depth 8 on 160 random images (a small folder: little to load and evaluate), a global
# batch of 16 (4 per replica on 4 replicas), 6 steps, synchronised batch norm
# (per-replica statistics are the one documented difference), a moving average, every
# step logged, one checkpoint at the end.
COMMON = ["--depth=8", "--data_source=folder", "--global_batch_size=16", "--epochs=1",
          f"--steps_per_epoch={STEPS}", "--eval_steps=1", "--log_every_steps=1",
          "--deterministic", "--sync_batch_norm", "--ema_decay=0.5", "--jit_compile=false"]
# Each recipe as it is, but for its length; blog with a clipnorm that binds on every
# variable (the gradients' norms are 0.1-2 here), so per-replica clipping would show.
SETTINGS = {
    "fast": ["--recipe=fast", "--precision=float32"],
    "he2016": ["--recipe=he2016", "--precision=float32"],
    "blog": ["--recipe=blog", "--clipnorm=0.05", "--precision=float32"],
    "blog_float16": ["--recipe=blog", "--clipnorm=0.05", "--precision=mixed_float16"],
    "blog_bfloat16": ["--recipe=blog", "--clipnorm=0.05", "--precision=mixed_bfloat16"],
}
# How the global batch is spread: (flags, workers).
LAYOUTS = {
    "mirrored2": (["--strategy=mirrored", "--cpu_devices=2"], 1),
    "mirrored4": (["--strategy=mirrored", "--cpu_devices=4"], 1),
    "workers2": (["--strategy=multi_worker"], 2),
}
CASES = ([(setting, "mirrored2") for setting in SETTINGS]
         + [("blog", "mirrored4"), ("blog", "workers2"), ("blog_float16", "workers2")])
# The tolerance, on ||change on N replicas - change on one device|| / ||change on one
# device|| over each group of tensors (weights, batch-norm statistics, optimizer slots,
# moving averages; change = final - initial): conftest.REPLICA_TOLERANCE says where it
# comes from; the logged losses agree to a tenth of it.
TOLERANCE = REPLICA_TOLERANCE


def precision_of(setting: str) -> str:
  return SETTINGS[setting][-1].split("=")[1]


@pytest.fixture(scope="module")
def data_dir(image_folder) -> pathlib.Path:
  return image_folder(train=16, test=1)


def start(root: pathlib.Path, name: str, args: list[str], layout: str | None,
          data_dir: pathlib.Path) -> list[Run]:
  """The run's processes (one per worker) training into root/name."""
  flags, workers = LAYOUTS[layout] if layout else (["--strategy=default"], 1)
  args = [*COMMON, f"--data_dir={data_dir}", *args, *flags, f"--model_dir={root / name}"]
  if workers == 1:
    return [Run(args, root / "logs", name)]
  ports = free_ports(workers)
  return [Run([*args, "--peer_timeout_seconds=120"], root / "logs", f"{name}-{index}",
              {"TF_CONFIG": tf_config(ports, index)}) for index in range(workers)]


def run_all(root: pathlib.Path, runs: list[tuple[str, list[str], str | None]],
            data_dir: pathlib.Path) -> None:
  """Runs (name, flags, layout) two processes at a time; each must succeed."""
  while runs:
    size = 1 if LAYOUTS.get(runs[0][2], ([], 1))[1] > 1 else 2
    batch, runs = runs[:size], runs[size:]
    started = [(name, start(root, name, args, layout, data_dir))
               for name, args, layout in batch]
    finish([p for _, processes in started for p in processes], TIMEOUT)
    for name, processes in started:
      for process in processes:
        assert process.returncode == 0, f"{name}:\n{process.stderr[-3000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> pathlib.Path:
  """Every run of CASES and its one-device reference, and the initial state."""
  root = tmp_path_factory.mktemp("equivalence")
  wanted = [(s, None) for s in SETTINGS] + CASES
  wanted = [(s, layout) for s, layout in wanted if cpu_runs(precision_of(s))]
  run_all(root, [(f"{s}-{layout or 'one'}", SETTINGS[s], layout) for s, layout in wanted],
          data_dir)
  write_initial_state(root / "initial")
  return root


def write_initial_state(prefix: pathlib.Path) -> None:
  """The state every run starts from (same seed and architecture), as a checkpoint."""
  from trainer import config as config_lib, schedule, state as state_lib
  config = config_lib.Config(depth=8, data_source="synthetic", ema_decay=0.5,
                             sync_batch_norm=True, precision="float32")
  plan = schedule.make_plan(config, replicas=1, num_train=1000, num_eval=10)
  state = state_lib.build_state(config, tf.distribute.get_strategy(), 10, plan, "float32")
  state.checkpoint.write(str(prefix / "ckpt"))


def train_log(model_dir: pathlib.Path) -> dict[str, np.ndarray]:
  return {tag: np.array([values[s] for s in sorted(values)])
          for tag in ("loss", "objective", "accuracy")
          for values in [logged(model_dir / "train", tag)]}


@pytest.mark.parametrize("setting, layout", CASES)
def test_replicas_and_workers_end_where_one_device_ends(runs, setting, layout):
  skip_unless_cpu_runs(precision_of(setting))
  tolerance = TOLERANCE[precision_of(setting)]
  reference = checkpoint_tensors(runs / f"{setting}-one" / "checkpoints")
  other = checkpoint_tensors(runs / f"{setting}-{layout}" / "checkpoints")
  assert set(other) == set(reference)
  errors = change_errors(reference, other, checkpoint_tensors(runs / "initial" / "ckpt"))
  # Optimizer slots: momentum's (blog has none).
  assert {"weights", "batch-norm statistics", "moving average"} <= set(errors), errors
  assert max(errors.values()) < tolerance, errors
  logs = train_log(runs / f"{setting}-one"), train_log(runs / f"{setting}-{layout}")
  for tag in logs[0]:
    assert len(logs[0][tag]) == STEPS == len(logs[1][tag]), tag
    np.testing.assert_allclose(logs[1][tag], logs[0][tag], rtol=tolerance / 10,
                               err_msg=tag)


def test_the_moving_average_of_per_replica_batch_norm_statistics_is_their_average(
    tmp_path, data_dir):
  """Without --sync_batch_norm each replica's statistics are its own batch's (batch-norm
  momentum 0: the last batch's); with a decay of 0.001 the saved average is (to 0.1%) the
  last statistics, which the save averaged over the replicas: so it must be their mean,
  not replica 0's copy (off by 3% to 100% here)."""
  run_all(tmp_path, [("local", ["--recipe=blog", "--precision=float32", "--ema_decay=0.001",
                                "--bn_momentum=0", "--nosync_batch_norm"], "mirrored2")],
          data_dir)
  tensors = checkpoint_tensors(tmp_path / "local" / "checkpoints")
  statistics = [key for key in tensors if "moving_" in key and key.startswith("model/")]
  assert statistics
  for key in statistics:
    average = tensors["ema/" + key[len("model/"):]]
    # The average keeps 0.1% of its previous value: at most 0.1% of the statistics' range
    # (twice that, for rounding) from the last statistics.
    np.testing.assert_allclose(average, tensors[key], rtol=0,
                               atol=2e-3 * np.abs(tensors[key]).max(), err_msg=key)


# The step itself, in processes of its own (tests/step_probe.py).

def probe(task: str, kind: str, root: pathlib.Path) -> list[dict]:
  """Runs step_probe.py: in one process with 2 replicas (mirrored), or as 2 workers of one
  replica each; returns each process's RESULT lines."""
  program = [str(pathlib.Path(__file__).with_name("step_probe.py"))]
  if kind == "mirrored":
    processes = [Run([task, kind], root, f"{task}-{kind}", program=program)]
  else:
    ports = free_ports(2)
    processes = [Run([task, kind], root, f"{task}-{kind}-{index}",
                     {"TF_CONFIG": tf_config(ports, index)}, program=program)
                 for index in range(2)]
  finish(processes, TIMEOUT)
  results = []
  for process in processes:
    assert process.returncode == 0, process.stderr[-3000:]
    results.append([json.loads(line.split(" ", 1)[1]) for line in process.stdout.splitlines()
                    if line.startswith("RESULT ")])
  return results


@pytest.mark.parametrize("kind", ["mirrored", "worker"])
def test_an_overflow_on_one_replica_skips_the_step_everywhere_and_halves_the_scale(
    tmp_path, kind):
  """mixed_float16; replica 1 (on worker 1 when workers) overflows at step 2 only."""
  skip_unless_cpu_runs("mixed_float16")
  processes = probe("overflow", kind, tmp_path)
  first, overflow, after = processes[0]
  replicas = 2 if kind == "mirrored" else 1
  assert first["scale"] == [2.0**15] * replicas and first["iterations"] == 1
  # Skipped on every replica: the same weights as before it, bit for bit; the scale halved.
  assert overflow["scale"] == [2.0**14] * replicas
  assert overflow["weights"] == first["weights"] and overflow["iterations"] == 1
  assert after["scale"] == [2.0**14] * replicas and after["iterations"] == 2
  assert after["weights"] != first["weights"] and all(after["finite"])
  assert len(set(after["weights"])) == 1  # Every replica holds the same weights.
  # Every worker took the same decisions and holds the same weights.
  assert all(p == processes[0] for p in processes), processes


def test_a_step_all_reduces_the_gradients_once(tmp_path):
  """One collective per replica per step, of the gradients and the loss: Keras's optimizer
  must not sum them again (that would be two, and twice the traffic)."""
  [[result]] = probe("count", "mirrored", tmp_path)
  reduced = result["reduced"]
  assert len(reduced) == 2 and len({device for _, device, _ in reduced}) == 2, reduced
  assert all(size == result["params"] + 1 for _, _, size in reduced), reduced
