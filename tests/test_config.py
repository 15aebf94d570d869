"""Pins trainer/config.py's validation and trainer/architecture.py's depth table, and that
neither loads TensorFlow or Keras.
"""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest

from trainer import architecture as architecture_lib
from trainer import config as config_lib
from trainer import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOAT_FIELDS = ("learning_rate", "warmup_epochs", "momentum", "weight_decay",
                "label_smoothing", "clipnorm", "ema_decay", "bn_momentum")


@pytest.mark.process
def test_building_and_rejecting_configs_loads_neither_tensorflow_nor_keras():
  # A fresh interpreter: this test process has TensorFlow loaded by conftest.py.
  code = textwrap.dedent("""
      import json, sys
      from trainer import config
      config.Config(depth=20)
      config.Config(depth=50, stage_widths=(16, 32, 64, 128))
      try:
        config.Config(depth=21)
        rejected = False
      except config.ConfigError:
        rejected = True
      print(json.dumps({"rejected": rejected,
                        "loaded": sorted({"tensorflow", "keras"} & set(sys.modules))}))
  """)
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=True)
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report == {"rejected": True, "loaded": []}


def test_config_error_is_the_user_error_of_trainer_errors():
  assert config_lib.ConfigError is errors.ConfigError
  with pytest.raises(errors.UserError, match=re.escape("--depth")):
    config_lib.Config(depth=21)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_non_finite_float_flag_is_rejected_naming_the_flag(name: str, value: float):
  with pytest.raises(config_lib.ConfigError,
                     match=re.escape(f"--{name} must be a finite number, got {value}")):
    config_lib.Config(**{name: value})


def test_every_float_field_is_checked_for_finiteness():
  # A new float flag must be added to FLOAT_FIELDS (and so to the test above).
  floats = {f.name for f in dataclasses.fields(config_lib.Config)
            if f.type in (float, float | None)}
  assert floats == set(FLOAT_FIELDS)


def test_finite_float_flags_pass():
  config = config_lib.Config(learning_rate=0.05, warmup_epochs=0.5, momentum=0.0,
                             weight_decay=0.0, label_smoothing=0.2, clipnorm=1.0,
                             ema_decay=0.999, bn_momentum=0.99)
  assert (config.warmup_epochs, config.clipnorm, config.ema_decay) == (0.5, 1.0, 0.999)
  assert config_lib.Config(clipnorm=None).clipnorm is None


def test_nan_warmup_is_rejected_even_where_a_range_check_would_pass_it():
  with pytest.raises(config_lib.ConfigError, match="--warmup_epochs must be a finite"):
    config_lib.Config(warmup_epochs=float("nan"), lr_schedule="constant")


@pytest.mark.parametrize("depth, overrides, expected", [
    (20, {}, ("cifar", "basic", (3, 3, 3), (16, 32, 64), "A", 20)),
    (56, {}, ("cifar", "basic", (9, 9, 9), (16, 32, 64), "A", 56)),
    (18, {}, ("imagenet", "basic", (2, 2, 2, 2), (64, 128, 256, 512), "B", 18)),
    (50, {"stage_widths": (16, 32, 64, 128)},
     ("imagenet", "bottleneck", (3, 4, 6, 3), (16, 32, 64, 128), "B", 50)),
])
def test_architecture_resolves_the_depth_table(depth: int, overrides: dict,
                                               expected: tuple):
  arch = architecture_lib.architecture(depth, **overrides)
  family, block, sizes, widths, shortcut, weighted_layers = expected
  assert arch.depth == depth
  assert arch.family == family
  assert arch.block == block
  assert arch.stage_sizes == sizes
  assert arch.stage_widths == widths
  assert arch.stem == "cifar"
  assert arch.shortcut == shortcut
  assert arch.plain is False
  assert arch.weighted_layers == weighted_layers
  assert config_lib.Config(depth=depth, **overrides).architecture() == arch


def test_unsupported_depth_is_a_config_error_listing_the_supported_depths():
  assert not architecture_lib.is_supported_depth(21)
  with pytest.raises(config_lib.ConfigError,
                     match=re.escape(architecture_lib.supported_depths_message())):
    config_lib.Config(depth=21)


# Each setting declared once: what is derived from the declaration.

def test_a_recipe_sets_exactly_the_settings_declared_as_set_by_a_recipe():
  from trainer import recipes
  declared = set(config_lib.fields_where(recipe=True))
  for name, values in recipes.RECIPES.items():
    assert set(values) == declared, name
  defaults = config_lib.Config()
  assert {name: getattr(defaults, name) for name in declared} == \
      recipes.RECIPES[config_lib.DEFAULT_RECIPE]


def test_the_help_of_a_recipe_setting_gives_each_recipes_value_read_from_the_recipes(
    monkeypatch):
  from trainer import flag_definitions, recipes
  assert flag_definitions.flag_help("learning_rate").endswith(
      "Default: from --recipe (fast 0.1, he2016 0.1, blog 0.01).")
  assert "he2016 the paper's 64k iterations" in flag_definitions.flag_help("epochs")
  monkeypatch.setitem(recipes.RECIPES, "fast", {**recipes.RECIPES["fast"], "momentum": 0.8})
  assert "(fast 0.8, he2016 0.9, blog 0)" in flag_definitions.flag_help("momentum")


def _outside(name: str, declared: config_lib.Setting):
  """A value just outside the declared bounds (None: unbounded)."""
  if declared.below is not None:
    return declared.below
  if declared.above is not None:
    return declared.above
  if declared.minimum is not None:
    return type(getattr(config_lib.Config(), name) or 1)(declared.minimum - 1)
  return None


@pytest.mark.parametrize("name", list(config_lib.SETTINGS))
def test_each_setting_refuses_what_its_declaration_does_not_allow(name: str):
  declared = config_lib.SETTINGS[name]
  if declared.choices is not None:
    with pytest.raises(config_lib.ConfigError, match=re.escape(f"--{name}='other' is not")):
      config_lib.Config(**{name: "other"})
  value = _outside(name, declared)
  if value is None:
    return
  with pytest.raises(config_lib.ConfigError, match=re.escape(f"--{name} must be ")):
    config_lib.Config(**{name: value})


def test_the_settings_roles_are_the_ones_resume_and_evaluation_use():
  # What a checkpoint cannot survive, and what decides the network an evaluation builds.
  architecture = ("depth", "plain", "stem", "shortcut", "stage_sizes", "stage_widths")
  assert set(architecture) < set(config_lib.RESUME_FIXED)
  assert set(config_lib.RUN_DEFINING) == {*architecture, "ema_decay"}
  # The training data and what maps steps to it.
  data = ("data_source", "synthetic_examples", "validation_split", "seed", "deterministic")
  assert set(data) < set(config_lib.RESUME_FIXED)
  # Where and how a command runs is its own; it never comes from the run.
  assert {"strategy", "precision", "jit_compile", "cpu_devices", "eval_steps"} <= set(
      config_lib.EVAL_COMMAND)
