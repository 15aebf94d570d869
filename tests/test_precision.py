"""--precision=auto on a CPU: the choice from bfloat16 support, --deterministic, the run's
length and the measured step times; the probe that measures them; a short run's float32
without a probe; a resumed run keeping the precision it started with."""

import json

import keras
import pytest
import tensorflow as tf

from conftest import (SMALL_SYNTHETIC_EXAMPLES, TINY_FLAGS, checkpoint_weights,
                      mirrored_on_two_cpus, run_main, skip_unless_cpu_runs)
from trainer import config as config_lib
from trainer import (distribute, precision_probe, run_dir, schedule, state as state_lib,
                     train)
from trainer.distribute import precision as precision_lib

TINY = dict(depth=8, data_source="synthetic", synthetic_examples=SMALL_SYNTHETIC_EXAMPLES,
            global_batch_size=16, steps_per_epoch=2, eval_steps=1)


def never(what: str):
  """A probe the choice must not call."""
  def called(*args, **kwargs):
    raise AssertionError(f"{what} was called")
  return called


# The choice.

LONG = distribute.PROBE_MIN_STEPS


@pytest.mark.parametrize("runs, deterministic, steps, seconds, expected, reason", [
    (False, False, LONG, None, "float32", "cannot run bfloat16 convolutions"),
    (True, True, LONG, None, "float32", "--deterministic"),
    (None, False, LONG - 1, None, "float32", f"a run of {LONG - 1} steps"),
    (True, False, LONG, (0.16, 0.1), "mixed_bfloat16", "measured 1.60x float32 on this "
                                                        "CPU for resnet20"),
    (True, False, LONG, (0.115, 0.1), "mixed_bfloat16", "measured 1.15x"),
    (True, False, LONG, (0.105, 0.1), "float32", "measured 1.05x"),
    (True, False, LONG, (0.055, 0.1), "float32", "measured 0.55x"),
], ids=["bf16-cannot-run", "deterministic", "short-run", "1.6x", "1.15x", "1.05x",
        "0.55x"])
def test_cpu_auto_is_bfloat16_only_where_it_measures_clearly_faster_on_a_long_run(
    runs, deterministic, steps, seconds, expected, reason):
  # What is not needed is not asked: no timing without bfloat16 kernels, neither probe
  # for a deterministic or short run.
  precision, why = distribute.choose_cpu_precision(
      network="resnet20", total_steps=steps, deterministic=deterministic,
      bfloat16_runs=never("the bfloat16 check") if runs is None else lambda: runs,
      seconds_per_step=never("the timing") if seconds is None else lambda: seconds)
  assert precision == expected, why
  assert reason in why


# The probe.

def test_the_probe_times_both_precisions_and_leaves_the_global_policy_as_it_was():
  skip_unless_cpu_runs("mixed_bfloat16")
  config = config_lib.Config(depth=8, data_source="synthetic", global_batch_size=8)
  strategy = mirrored_on_two_cpus()
  plan = schedule.make_plan(config, replicas=2, num_train=80, num_eval=16)
  before = keras.mixed_precision.global_policy().name
  float32, bfloat16 = precision_probe.seconds_per_step(
      config, strategy, plan, num_classes=10, jit_compile=False)
  assert float32 > 0 and bfloat16 > 0
  assert keras.mixed_precision.global_policy().name == before


def test_a_long_auto_run_probes_before_its_state_and_trains_the_usual_variables(
    tmp_path, monkeypatch):
  # The probe's throwaway models must not rename the run's variables (checkpoint keys).
  skip_unless_cpu_runs("mixed_bfloat16")
  monkeypatch.setattr(precision_lib, "PROBE_MIN_STEPS", 1)
  timings = []
  probe = precision_probe.seconds_per_step

  def recording_probe(*args, **kwargs):
    timings.append(probe(*args, **kwargs))
    return timings[-1]

  monkeypatch.setattr(precision_probe, "seconds_per_step", recording_probe)
  config = config_lib.Config(**TINY, epochs=1, model_dir=str(tmp_path / "run"))
  try:
    outcome = train.run_training(config, tf.distribute.get_strategy())
  finally:
    keras.mixed_precision.set_global_policy("float32")
  resolved = json.loads((tmp_path / "run" / "config.json").read_text())["precision_resolved"]
  assert len(timings) == 1  # Probed once, and the choice follows what it measured.
  float32, bfloat16 = timings[0]
  assert resolved == ("mixed_bfloat16" if float32 / bfloat16
                      >= precision_lib.BFLOAT16_MIN_SPEEDUP else "float32")
  assert outcome.state.model.get_layer("stem_conv").compute_dtype == {
      "float32": "float32", "mixed_bfloat16": "bfloat16"}[resolved]
  expected = {v.path for v in state_lib.build_model(config, 10).variables}
  assert checkpoint_weights(tmp_path / "run" / "checkpoints").keys() == expected


# Short and resumed runs.

@pytest.mark.process
def test_a_short_auto_run_on_cpu_records_float32_without_probing(tmp_path):
  model_dir = tmp_path / "run"
  result = run_main(*TINY_FLAGS, "--epochs=1", "--precision=auto",
                    f"--model_dir={model_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  saved = json.loads((model_dir / "config.json").read_text())
  assert saved["precision_resolved"] == "float32"
  assert ("precision auto: float32 (a run of 4 steps; timing mixed_bfloat16 pays from "
          "1000)") in result.stderr
  assert "precision probe" not in result.stderr


def test_a_resumed_auto_run_keeps_the_precision_it_recorded(tmp_path, monkeypatch):
  # Recorded mixed_bfloat16 (as a probe may have chosen), the resumed run keeps it though
  # it is short, where a new run would choose float32, and measures nothing.
  skip_unless_cpu_runs("mixed_bfloat16")
  monkeypatch.setattr(precision_probe, "seconds_per_step", never("the probe"))
  config = config_lib.Config(**TINY, epochs=1, model_dir=str(tmp_path / "run"))
  strategy = tf.distribute.get_strategy()
  train.run_training(config, strategy)
  config_path = tmp_path / "run" / "config.json"
  saved = json.loads(config_path.read_text())
  assert (saved["precision"], saved["precision_resolved"]) == ("auto", "float32")
  config_path.write_text(json.dumps({**saved, "precision_resolved": "mixed_bfloat16"}))
  try:
    outcome = train.run_training(config_lib.Config(**{**TINY, "epochs": 2,
                                                      "model_dir": config.model_dir}),
                                 strategy)
  finally:
    keras.mixed_precision.set_global_policy("float32")
  assert outcome.metrics["resumed_from_step"] == 2
  assert outcome.state.model.get_layer("stem_conv").compute_dtype == "bfloat16"
  assert json.loads(config_path.read_text())["precision_resolved"] == "mixed_bfloat16"


def test_a_resume_refused_for_its_settings_is_refused_before_the_probe(tmp_path,
                                                                       monkeypatch):
  # The probe takes seconds to minutes; a run whose model dir holds another network must
  # be told so at once, whatever auto would have measured. (Had the saved run been auto
  # too, the resumed one would keep its recorded precision and probe nothing anyway.)
  config = config_lib.Config(**TINY, epochs=1, precision="float32",
                             model_dir=str(tmp_path / "run"))
  strategy = tf.distribute.get_strategy()
  train.run_training(config, strategy)
  monkeypatch.setattr(precision_lib, "PROBE_MIN_STEPS", 1)
  # As on a bfloat16 CPU, where the probe would run (on any machine).
  monkeypatch.setattr(precision_lib, "half_precision_runs", lambda *args: True)
  monkeypatch.setattr(precision_probe, "seconds_per_step", never("the probe"))
  with pytest.raises(run_dir.RunDirError, match="--depth: 8 in .*, 14 now"):
    train.run_training(config_lib.Config(**{**TINY, "depth": 14, "epochs": 2,
                                            "model_dir": config.model_dir}), strategy)


def test_only_a_resumed_auto_run_reads_its_recorded_precision(tmp_path):
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  auto = config_lib.Config(data_source="synthetic", model_dir=str(model_dir))
  def recorded(config):
    return run_dir.recorded_precision(
        run_dir.read_earlier_run(config.model_dir, ignore=config.overwrite), config)

  assert recorded(auto) is None  # A new run.
  for saved, config, expected in (
      ("auto", auto, "mixed_bfloat16"),
      ("mixed_bfloat16", auto, None),  # It was the user's choice; auto is now.
      ("auto", config_lib.Config(**{**auto.__dict__, "precision": "float32"}), None),
      ("auto", config_lib.Config(**{**auto.__dict__, "overwrite": True}), None)):
    (model_dir / "config.json").write_text(json.dumps(
        {"precision": saved, "precision_resolved": "mixed_bfloat16"}))
    assert recorded(config) == expected, (saved, config.precision)


def test_a_recorded_precision_this_cpu_cannot_run_falls_back_to_float32(monkeypatch):
  strategy = tf.distribute.get_strategy()
  run = distribute.CpuRun(network="resnet8", total_steps=10, deterministic=False,
                          seconds_per_step=never("the probe"), recorded="mixed_bfloat16")
  monkeypatch.setattr(precision_lib, "half_precision_runs",
                      lambda precision, strategy: precision == "float32")
  assert distribute.resolve_precision("auto", strategy, run) == "float32"
  monkeypatch.setattr(precision_lib, "half_precision_runs",
                      lambda precision, strategy: True)
  assert distribute.resolve_precision("auto", strategy, run) == "mixed_bfloat16"
  # Evaluation and export pass no run: float32 on a CPU, unprobed.
  assert distribute.resolve_precision("auto", strategy) == "float32"
