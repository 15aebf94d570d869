"""The trainer's flags, derived from the settings' one declaration (trainer/config.py's
Config fields): name, type, default, allowed values, lower bound and help.

trainer/main.py defines all of them; a script that takes some of the same flags defines
those from here as well (`define("depth", "plain", defaults={"depth": 20})`), so a flag
name means one thing everywhere. Defining is not reading: trainer/main.py stays the only
trainer module that reads flag values. docs/flags.md documents these flags and
tests/test_docs.py holds the two equal. Pure Python: imports neither TensorFlow nor Keras.
"""

import dataclasses

from absl import flags

from trainer import config as config_lib
from trainer import recipes

# The flags defined through `define` belong to its caller (absl's key flags: what a
# script's --help lists), not to this module.
flags.disclaim_key_flags()

# The one flag that is not a setting of the run: how much of TensorFlow's output to show.
TF_LOGS_HELP = "Show TensorFlow's C++ start-up and device messages (hidden by default)."
# --help's groups: the settings' groups, then the flags that are not settings.
HELP_GROUPS = {**config_lib.groups(), "output": ("tf_logs",)}


def _recipe_text(value, none_text: str) -> str:
  if value is None:
    return none_text
  if isinstance(value, bool):
    return str(value).lower()
  return f"{value:g}" if isinstance(value, float) else str(value)


def flag_help(name: str) -> str:
  """A setting's help; for one a recipe sets, each recipe's value, read from RECIPES."""
  declared = config_lib.SETTINGS[name]
  if not declared.recipe:
    return declared.help
  values = ", ".join(f"{recipe} {_recipe_text(values[name], declared.recipe_none)}"
                     for recipe, values in recipes.RECIPES.items())
  return f"{declared.help} Default: from --recipe ({values})."


def _define_setting(field: dataclasses.Field, default, help_text: str,
                    flag_values: flags.FlagValues) -> None:
  declared = field.metadata["setting"]
  common = dict(help=help_text, flag_values=flag_values)
  if field.type is bool:
    flags.DEFINE_boolean(field.name, default, **common)
  elif field.type in (int, int | None):
    # absl's bound stops a bad value with the flag's help; a range (--seed's) is left to
    # the Config's check, which names the whole range.
    ranged = declared.minimum is None or declared.below is not None
    lower = None if ranged else int(declared.minimum)
    flags.DEFINE_integer(field.name, default, lower_bound=lower, **common)
  elif field.type in (float, float | None):
    flags.DEFINE_float(field.name, default, **common)
  elif field.type == tuple[int, ...] | None:
    flags.DEFINE_list(field.name, default, **common)
  elif declared.choices is not None:
    flags.DEFINE_enum(field.name, default, list(declared.choices), **common)
  else:
    flags.DEFINE_string(field.name, default, **common)


def define(*names: str, defaults: dict | None = None, notes: dict | None = None,
           flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines these trainer flags (all of them when none is named) for the caller.

  A flag's default is its setting's, except for the settings a recipe sets, whose flags
  have none: trainer/main.py then takes the recipe's value.

  Args:
    names: flag names: Config fields, or "tf_logs".
    defaults: a script's own defaults for some of them (name -> value).
    notes: text added to a flag's help (name -> text), e.g. what a script does with it.
    flag_values: where to define them.
  """
  defaults, notes = defaults or {}, notes or {}
  fields = {field.name: field for field in dataclasses.fields(config_lib.Config)}
  for name in names or (*fields, "tf_logs"):
    help_text = TF_LOGS_HELP if name == "tf_logs" else flag_help(name)
    help_text = f"{help_text} {notes[name]}" if name in notes else help_text
    if name == "tf_logs":
      flags.DEFINE_boolean(name, defaults.get(name, False), help=help_text,
                           flag_values=flag_values)
      continue
    field = fields[name]
    default = None if field.metadata["setting"].recipe else field.default
    _define_setting(field, defaults.get(name, default), help_text, flag_values)
