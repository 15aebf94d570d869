"""The combination suite: tiny real runs of the trainer in a pairwise covering array of the
settings users combine (every pair of values of any two axes below appears in at least one
case; tests/pairwise.py), each checked against the invariants of docs/invariants.md:

I1  it trains, evaluates and exports, or is refused before anything is written;
I2  stopped (SIGKILL, or SIGTERM to one process or worker) and resumed, it trains on the
    planned global batches: step k on the k-th batch of the uninterrupted run, each
    example at most once an epoch, whatever the replicas and workers;
I3  its final test, flip and EMA metrics cover the whole test split, and every evaluation
    records how many examples it covered;
I4  on several replicas or workers with --sync_batch_norm, it ends where one device ends,
    within float rounding;
I5  its export reproduces its checkpoint's test metrics.

The runs record what they trained on (trainer.main.RECORD_BATCHES_VARIABLE). The table of
cases, with each one's outcome, is printed at the end of the test session (conftest.py).
"""

import dataclasses
import json
import pathlib
import re
import signal
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import pairwise
from conftest import (REPLICA_TOLERANCE, Run, change_errors, checkpoint_tensors, cpu_runs,
                      finish, free_ports, planned_batches, recorded_batches, tf_config)

AXES = {
    "strategy": ("default", "mirrored", "workers"),  # 1 device, 2 logical CPUs, 2 workers
    "precision": ("float32", "mixed_bfloat16", "mixed_float16"),
    "recipe": ("fast", "he2016", "blog"),  # blog with a clipnorm that binds (below)
    "stop": ("none", "kill", "sigterm"),   # SIGKILL all mid-epoch; SIGTERM to one process
    "jit_compile": (False, True),
    "sync_batch_norm": (False, True),
    "deterministic": (False, True),
    "ema": (False, True),
    "validation": (False, True),
    "eval_cap": (False, True),
    "eval_flip": (False, True),
}
# 100 training and 40 test images (10 classes), a global batch of 16 over 2 epochs: 6
# steps an epoch, or 4 after holding out 24 for validation. A capped evaluation covers 16.
TRAIN_PER_CLASS, TEST_PER_CLASS = 10, 4
BATCH, EPOCHS, VALIDATION, EVAL_STEPS = 16, 2, 24, 1
TEST_EXAMPLES = 10 * TEST_PER_CLASS
TIMEOUT = 300


def xla_with_sync_batch_norm_on_replicas(case: dict) -> bool:
  """Refused on every machine (a case built so far may lack some settings)."""
  return bool(case.get("jit_compile") and case.get("sync_batch_norm")
              and case.get("strategy", "default") != "default")


def by_design(case: dict) -> bool:
  """Whether the covering array may hold a (partial) case: refused combinations train
  nothing, so they hold no pairs; they are tried on their own (the last cases)."""
  return not xla_with_sync_batch_norm_on_replicas(case)


def refusal(case: dict) -> str | None:
  """The start of the error the trainer refuses a case with on this machine, or None."""
  if xla_with_sync_batch_norm_on_replicas(case):
    return "--sync_batch_norm cannot be combined with XLA"
  if not cpu_runs(case["precision"]):
    return f"--precision={case['precision']} cannot run on this CPU"
  return None


DEFAULT = {name: values[0] for name, values in AXES.items()}
CASES = (pairwise.covering_cases(AXES, by_design)
         + [{**DEFAULT, "strategy": strategy, "jit_compile": True, "sync_batch_norm": True}
            for strategy in ("mirrored", "workers")])
SHORT = {"mixed_bfloat16": "bf16", "mixed_float16": "fp16", "float32": "fp32"}


def case_id(case: dict) -> str:
  """default-fp32-fast-none+xla+syncbn+det+ema+val+cap+flip (the flags that are on)."""
  words = [case["strategy"], SHORT[case["precision"]], case["recipe"], case["stop"]]
  words += [short for name, short in (("jit_compile", "xla"), ("sync_batch_norm", "syncbn"),
                                      ("deterministic", "det"), ("ema", "ema"),
                                      ("validation", "val"), ("eval_cap", "cap"),
                                      ("eval_flip", "flip")) if case[name]]
  return "-".join(words[:4]) + "".join(f"+{w}" for w in words[4:])


def table() -> list[str]:
  """The cases as the session summary prints them."""
  names = list(AXES)
  rows = [[case_id(case)] + [str(case[name]) for name in names] for case in CASES]
  header = ["case", *names]
  widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
  return [" ".join(cell.ljust(width) for cell, width in zip(row, widths))
          for row in [header, *rows]]


def train_flags(case: dict, data_dir: pathlib.Path, model_dir: pathlib.Path) -> list[str]:
  recipe = [f"--recipe={case['recipe']}"]
  if case["recipe"] == "blog":
    recipe.append("--clipnorm=0.05")  # binds on every variable (norms 0.1-2 here)
  return [
      "--depth=8", "--data_source=folder", f"--data_dir={data_dir}",
      f"--global_batch_size={BATCH}", f"--epochs={EPOCHS}", *recipe,
      f"--model_dir={model_dir}",
      # A stopped case saves every step, so that it resumes mid-epoch; others at epoch ends.
      f"--checkpoint_every_steps={1 if case['stop'] != 'none' else 1000}",
      f"--precision={case['precision']}",
      f"--jit_compile={str(case['jit_compile']).lower()}",
      "--sync_batch_norm" if case["sync_batch_norm"] else "--nosync_batch_norm",
      "--deterministic" if case["deterministic"] else "--nodeterministic",
      *(["--ema_decay=0.5"] if case["ema"] else []),
      *([f"--validation_split={VALIDATION}"] if case["validation"] else []),
      *([f"--eval_steps={EVAL_STEPS}"] if case["eval_cap"] else []),
      *(["--eval_flip"] if case["eval_flip"] else [])]


def launch(case: dict, args: list[str], logs: pathlib.Path, name: str) -> list[Run]:
  """The run's processes: one, or one per worker (worker 0, the chief, first)."""
  from trainer import main
  env = {main.RECORD_BATCHES_VARIABLE: "1"}
  if case["strategy"] != "workers":
    layout = (["--strategy=mirrored", "--cpu_devices=2"] if case["strategy"] == "mirrored"
              else ["--strategy=default"])
    return [Run([*args, *layout], logs, name, env)]
  ports = free_ports(2)
  return [Run([*args, "--strategy=multi_worker", "--peer_timeout_seconds=120"], logs,
              f"{name}-{index}", {**env, "TF_CONFIG": tf_config(ports, index)})
          for index in range(2)]


def wait_for_step(model_dir: pathlib.Path, run: Run, step: int) -> None:
  """Until the run has recorded training step `step` (batches.jsonl); fails if it ends."""
  deadline = time.time() + TIMEOUT
  record = model_dir / "batches.jsonl"
  while not (record.exists() and f'"step": {step},' in record.read_text()):
    assert not run.poll(), f"{run.name} ended before step {step}:\n{run.stderr[-3000:]}"
    assert time.time() < deadline, f"{run.name}: no step {step} within {TIMEOUT} s"
    time.sleep(0.02)


def succeeded(runs: list[Run], code: int = 0) -> None:
  for run in runs:
    assert run.returncode == code, f"{run.name} exit {run.returncode}:\n{run.stderr[-3000:]}"


@dataclasses.dataclass
class Outcome:
  """What one case's processes did."""
  model_dir: pathlib.Path
  steps_per_epoch: int
  attempts: list[list[Run]]  # each launch of the training command
  evaluation: Run
  export: Run


def train_stop_resume(case: dict, data_dir: pathlib.Path, root: pathlib.Path) -> Outcome:
  """Trains the case (stopped midway and resumed, as the case says), then evaluates and
  exports it at once, in processes of their own."""
  model_dir, logs = root / "run", root / "logs"
  args = train_flags(case, data_dir, model_dir)
  steps_per_epoch = (10 * TRAIN_PER_CLASS - (VALIDATION if case["validation"] else 0)) // BATCH
  attempts = [launch(case, args, logs, "train")]
  if case["stop"] != "none":
    # Two steps into the second epoch: a kill resumes from the checkpoint of step 7 or 8,
    # a SIGTERM saves at step 8 or 9; mid-epoch either way.
    wait_for_step(model_dir, attempts[0][0], steps_per_epoch + 2)
    if case["stop"] == "kill":
      for run in attempts[0]:
        run.kill()
    else:
      attempts[0][-1].process.send_signal(signal.SIGTERM)  # worker 1 of two
      finish(attempts[0], TIMEOUT)
      succeeded(attempts[0], 143)
    attempts.append(launch(case, args, logs, "resumed"))
  finish(attempts[-1], TIMEOUT)
  succeeded(attempts[-1])
  best = ["--checkpoint=best"] if case["validation"] else []  # what export takes
  evaluation = Run(["--mode=eval", f"--model_dir={model_dir}", *best], logs, "eval")
  export = Run(["--mode=export", f"--model_dir={model_dir}"], logs, "export")
  finish([evaluation, export], TIMEOUT)
  succeeded([evaluation, export])
  return Outcome(model_dir, steps_per_epoch, attempts, evaluation, export)


# The invariants.

def read_json(path: pathlib.Path) -> dict:
  return json.loads(path.read_text())


def run_splits(model_dir: pathlib.Path, data_dir: pathlib.Path):
  """The run's data split as the trainer made it (trainer.data.load)."""
  from trainer import config as config_lib, data
  settings = read_json(model_dir / "config.json")
  return data.load(config_lib.Config(
      data_source="folder", data_dir=str(data_dir), seed=settings["seed"],
      validation_split=settings["validation_split"]))


def check_batches(outcome: Outcome, case: dict) -> None:
  """I2: each step's recorded global batch (a step's last record: a resumed run trains
  again what a kill lost) is the plan's, made anew here from the run's data seed by one
  input pipeline; every epoch holds each example at most once."""
  from input_pipeline import pipeline
  total = read_json(outcome.model_dir / "config.json")["total_steps"]
  recorded = recorded_batches(outcome.model_dir)
  assert sorted(recorded) == list(range(1, total + 1))
  for step, ids in enumerate(planned_batches(outcome.model_dir, total), 1):
    assert recorded[step] == ids, f"step {step}"
  spe = outcome.steps_per_epoch
  for epoch in range(EPOCHS):
    ids = np.concatenate([recorded[s] for s in range(epoch * spe + 1, (epoch + 1) * spe + 1)])
    indices = pipeline.decode_example_ids(ids)[0]
    assert len(set(indices)) == spe * BATCH, f"epoch {epoch + 1} repeats an example"
  if case["stop"] != "none":
    resumed = re.search(r"resumed from \S+ at step (\d+)", outcome.attempts[1][0].stderr)
    assert resumed, outcome.attempts[1][0].stderr[-3000:]
    step = int(resumed.group(1))
    assert spe < step < 2 * spe, f"resumed at step {step}, not inside the second epoch"


def check_coverage(outcome: Outcome, case: dict) -> None:
  """I3: the final metrics cover the whole test split; every record says how much."""
  metrics = read_json(outcome.model_dir / "metrics.json")
  evaluated = read_json(outcome.model_dir / "eval.json")
  assert metrics["test_examples"] == TEST_EXAMPLES
  assert np.sum(metrics["test_confusion_matrix"]) == TEST_EXAMPLES
  assert evaluated["examples"] == evaluated["split_examples"] == TEST_EXAMPLES
  split, size = ("validation", VALIDATION) if case["validation"] else ("test", TEST_EXAMPLES)
  expected = min(size, BATCH * EVAL_STEPS) if case["eval_cap"] else size
  assert [h[f"{split}_examples"] for h in metrics["history"]] == [expected] * EPOCHS
  for result in (metrics, evaluated):
    for key, wanted in (("test_flip_accuracy", case["eval_flip"]),
                        ("test_ema_accuracy", case["ema"])):
      assert (key in result) == wanted, key


def check_export(outcome: Outcome, data_dir: pathlib.Path) -> None:
  """I5: the exported SavedModel, on the whole test split, gives the test metrics that
  --mode=eval measured for the checkpoint it exported. Both compute in float32 from the
  same weights; export.py verifies the logits to 1e-4, so only an example whose top two
  logits are closer than twice that may change its prediction, and the mean loss moves
  by at most 2e-4."""
  metrics = read_json(outcome.model_dir / "metrics.json")
  evaluated = read_json(outcome.model_dir / "eval.json")
  assert evaluated["checkpoint"].endswith(metrics["export_checkpoint"])
  test = run_splits(outcome.model_dir, data_dir).test
  served = tf.saved_model.load(str(outcome.model_dir / "export" / "saved_model"))
  logits = served.signatures["serving_default"](images=tf.constant(test.images))["logits"]
  logits = logits.numpy()
  accuracy = np.mean(np.argmax(logits, -1) == test.labels)
  loss = np.mean(tf.keras.losses.sparse_categorical_crossentropy(
      test.labels, logits, from_logits=True).numpy())
  top_two = np.sort(logits, -1)[:, -2:]
  close = int(np.sum(top_two[:, 1] - top_two[:, 0] < 2e-4))
  assert abs(accuracy - evaluated["test_accuracy"]) * TEST_EXAMPLES <= close
  assert loss == pytest.approx(evaluated["test_loss"], abs=2e-4)


def check_one_device(outcome: Outcome, case: dict, root: pathlib.Path) -> float:
  """I4: the same run on one device, uninterrupted, in this process, from the same data
  seed (its config.json, as a resumed run reads it), ends at the same weights, batch-norm
  statistics, optimizer slots and moving averages, up to float rounding."""
  from trainer import config as config_lib, schedule, state as state_lib, train
  reference = root / "one_device"
  reference.mkdir()
  settings = read_json(outcome.model_dir / "config.json")
  (reference / "config.json").write_text(json.dumps(settings))
  fields = {f.name for f in dataclasses.fields(config_lib.Config)}
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()
            if k in fields}
  config = config_lib.Config(**{**values, "strategy": "default", "cpu_devices": 1,
                                "model_dir": str(reference)})
  strategy = tf.distribute.get_strategy()
  try:
    train.run_training(config, strategy)
    # The state every run starts from (same seed and architecture).
    plan = schedule.make_plan(config, replicas=1, num_train=settings["train_examples"],
                              num_eval=TEST_EXAMPLES)
    initial = state_lib.build_state(config, strategy, 10, plan, case["precision"])
    initial.checkpoint.write(str(root / "initial" / "ckpt"))
  finally:  # Both set Keras's global dtype policy, which later tests of this process share.
    keras.mixed_precision.set_global_policy("float32")
  errors = change_errors(checkpoint_tensors(reference / "checkpoints"),
                         checkpoint_tensors(outcome.model_dir / "checkpoints"),
                         checkpoint_tensors(root / "initial" / "ckpt"))
  assert max(errors.values()) < REPLICA_TOLERANCE[case["precision"]], errors
  return max(errors.values())


def test_the_cases_hold_every_pair_of_values_of_any_two_settings():
  covering = CASES[:-2]  # the last two: the refusals tried on their own
  assert not pairwise.uncovered_pairs(AXES, covering, by_design)
  assert all(by_design(case) for case in covering)
  assert covering == pairwise.covering_cases(AXES, by_design)  # the same table every time
  # Fewer cases than a plain greedy pass makes (each is several trainer processes).
  assert len(covering) < len(pairwise.covering_cases(AXES, by_design, shrink=False))


@pytest.fixture(scope="module")
def data_dir(image_folder) -> pathlib.Path:
  return image_folder(train=TRAIN_PER_CLASS, test=TEST_PER_CLASS)


@pytest.mark.process
@pytest.mark.parametrize("case", CASES, ids=[case_id(case) for case in CASES])
def test_every_combination_holds_the_invariants(case, data_dir, tmp_path, record_property):
  record_property("case", case_id(case))
  reason = refusal(case)
  if reason is not None:
    check_refused(case, data_dir, tmp_path, reason)
    record_property("outcome", f"refused: {reason}")
    return
  outcome = train_stop_resume(case, data_dir, tmp_path)  # I1
  checks = {"I2": lambda: check_batches(outcome, case),
            "I3": lambda: check_coverage(outcome, case),
            "I5": lambda: check_export(outcome, data_dir)}
  if case["strategy"] != "default" and case["sync_batch_norm"]:
    checks["I4"] = lambda: check_one_device(outcome, case, tmp_path)
  broken, held = [], ["I1"]
  for name, check in sorted(checks.items()):
    try:
      measured = check()
    except Exception as e:  # Every invariant is checked; all that break are named.
      broken.append(f"{name}: {type(e).__name__}: {str(e)[:1500]}")
    else:
      held.append(name if measured is None else f"{name} ({measured:.1e})")
  assert not broken, "\n".join(broken)
  record_property("outcome", f"held {', '.join(held)}")


def check_refused(case: dict, data_dir: pathlib.Path, root: pathlib.Path,
                  reason: str) -> None:
  """I1's other half: refused with exit code 2 and the reason, before writing anything."""
  runs = launch(case, train_flags(case, data_dir, root / "run"), root / "logs", "train")
  finish(runs, TIMEOUT)
  for run in runs:
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"error: {reason}" in run.stderr, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
  assert not (root / "run").exists()
