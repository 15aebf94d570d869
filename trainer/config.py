"""The run's one configuration object: frozen, typed, validated; built by trainer/main.py."""

import dataclasses
import json
import math

from trainer import architecture as architecture_lib
from trainer.errors import ConfigError

DATA_SOURCES = ("tfds", "folder", "synthetic")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
MODES = ("train", "eval", "export")
RECIPE_NAMES = ("fast", "he2016", "blog")
LR_SCHEDULES = ("cosine", "he2016", "constant")
ALL_REDUCE = ("auto", "nccl", "hierarchical_copy", "reduction_to_one_device", "ring")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
JIT_COMPILE = ("auto", "true", "false")
# --learning_rate is defined for this global batch and scaled linearly (Goyal et al. 2017).
REFERENCE_BATCH_SIZE = 128
# Logical CPU devices are for trying replicas without GPUs, or one replica per core. Each
# replica traces its own copy of the step: 32 of them took 110 s to start a ResNet-8 on 2
# cores, and 100,000 were still being created after 90 s.
MAX_CPU_DEVICES = 64


@dataclasses.dataclass(frozen=True)
class Config:
  """Every setting of a run. Field names equal the flag names of trainer/main.py."""
  mode: str = "train"
  # Model.
  depth: int = 50
  plain: bool = False
  stem: str = "cifar"
  shortcut: str | None = None
  stage_sizes: tuple[int, ...] | None = None
  stage_widths: tuple[int, ...] | None = None
  bn_momentum: float = 0.9
  zero_init_residual: bool = False
  # Data.
  data_source: str = "tfds"
  data_dir: str | None = None
  deterministic: bool = False
  # Recipe and schedule (defaults: the "fast" recipe). Epochs are converted to steps once,
  # in trainer.schedule.make_plan; epochs=None means the he2016 paper length.
  recipe: str = "fast"
  epochs: int | None = 30
  steps_per_epoch: int | None = None
  eval_steps: int | None = None
  global_batch_size: int = 128
  learning_rate: float = 0.1
  lr_schedule: str = "cosine"
  warmup_epochs: float = 2.0
  momentum: float = 0.9
  nesterov: bool = True
  weight_decay: float = 1e-3
  label_smoothing: float = 0.1
  clipnorm: float | None = None
  ema_decay: float = 0.0
  eval_flip: bool = False
  validation_split: int = 0
  # Hardware.
  strategy: str = "auto"
  num_gpus: int | None = None
  tpu: str | None = None
  all_reduce: str = "auto"
  peer_timeout_seconds: int = 300
  cpu_devices: int = 1
  sync_batch_norm: bool = False
  precision: str = "auto"
  jit_compile: str = "auto"
  steps_per_execution: int | None = None  # None: auto (distribute/precision.py)
  # Output.
  model_dir: str = "runs/resnet"
  overwrite: bool = False
  checkpoint: str | None = None
  export_dir: str | None = None
  profile_steps: tuple[int, ...] | None = None
  log_every_steps: int = 100
  checkpoint_every_steps: int = 1000
  keep_checkpoints: int = 3
  seed: int = 0

  def __post_init__(self):
    # First: nan passes every `< 0` and range check below, and inf passes most of them.
    _check_finite_floats(self)
    _one_of("mode", self.mode, MODES)
    _one_of("recipe", self.recipe, RECIPE_NAMES)
    _one_of("lr_schedule", self.lr_schedule, LR_SCHEDULES)
    _one_of("data_source", self.data_source, DATA_SOURCES)
    _one_of("strategy", self.strategy, STRATEGIES)
    _one_of("precision", self.precision, PRECISIONS)
    _one_of("jit_compile", self.jit_compile, JIT_COMPILE)
    _one_of("all_reduce", self.all_reduce, ALL_REDUCE)
    try:
      self.architecture()
    except ValueError as e:
      raise ConfigError(f"--depth/--stem/--shortcut/--stage_*: {e}") from None
    for name in ("global_batch_size", "cpu_devices", "log_every_steps",
                 "checkpoint_every_steps", "keep_checkpoints", "peer_timeout_seconds"):
      _positive(name, getattr(self, name))
    if self.cpu_devices > MAX_CPU_DEVICES:
      raise ConfigError(f"--cpu_devices must be at most {MAX_CPU_DEVICES}, got "
                        f"{self.cpu_devices}: logical CPU devices are for trying replicas "
                        "without GPUs (or one per core), and every replica traces its own "
                        "copy of the step, so start-up time grows with their number")
    for name in ("epochs", "steps_per_epoch", "eval_steps", "num_gpus", "clipnorm",
                 "steps_per_execution"):
      if getattr(self, name) is not None:
        _positive(name, getattr(self, name))
    for name in ("learning_rate",):
      _positive(name, getattr(self, name))
    if self.epochs is None and self.lr_schedule != "he2016":
      raise ConfigError("--epochs is needed unless --lr_schedule=he2016 (whose default "
                        "length is the paper's 64k iterations)")
    if not 0 <= self.label_smoothing < 1:
      raise ConfigError(f"--label_smoothing must be in [0, 1), got {self.label_smoothing}")
    if not 0 <= self.ema_decay < 1:
      raise ConfigError(f"--ema_decay must be in [0, 1) (0: off), got {self.ema_decay}")
    for name in ("weight_decay", "warmup_epochs", "momentum", "validation_split"):
      if getattr(self, name) < 0:
        raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
    if not 0 <= self.seed < 2**32:  # NumPy's seeds (keras.utils.set_random_seed) are 32 bits.
      raise ConfigError(f"--seed must be in [0, 2**32), got {self.seed}")
    if not 0 <= self.bn_momentum < 1:
      raise ConfigError(f"--bn_momentum must be in [0, 1), got {self.bn_momentum}")
    if self.data_source == "folder" and not self.data_dir:
      raise ConfigError("--data_source=folder needs --data_dir=DIR holding DIR/train/<class>/ "
                        "and DIR/test/<class>/ image folders")
    if self.strategy == "tpu" and not self.tpu:
      raise ConfigError("--strategy=tpu needs --tpu=NAME_OR_ADDRESS (or 'local')")
    if self.profile_steps is not None and (
        len(self.profile_steps) != 2 or not 0 <= self.profile_steps[0] < self.profile_steps[1]):
      raise ConfigError(f"--profile_steps must be START,END with 0 <= START < END, got "
                        f"{','.join(map(str, self.profile_steps))}")
    if self.deterministic and self.jit_compile == "true" and self.stem == "imagenet":
      raise ConfigError("--deterministic cannot be combined with --jit_compile=true for "
                        "--stem=imagenet: XLA has no deterministic max-pool gradient")
    if not self.model_dir:
      raise ConfigError("--model_dir must not be empty")
    if "://" in self.model_dir:
      # The run dir's lock (flock) and atomic JSON writes (rename) need a POSIX file
      # system; object stores (gs://, s3://) have neither.
      raise ConfigError(f"--model_dir={self.model_dir}: object stores are not supported; "
                        "use a local disk or a network file system (e.g. NFS) that every "
                        "worker mounts")

  def architecture(self) -> architecture_lib.Architecture:
    """The model's architecture (raises ValueError when the settings are inconsistent)."""
    return architecture_lib.architecture(
        self.depth, plain=self.plain, stem=self.stem, shortcut=self.shortcut,
        stage_sizes=self.stage_sizes, stage_widths=self.stage_widths)

  @property
  def scaled_learning_rate(self) -> float:
    """--learning_rate scaled linearly from a global batch of 128 to ours."""
    return self.learning_rate * self.global_batch_size / REFERENCE_BATCH_SIZE

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def _check_finite_floats(config: Config) -> None:
  # Every float field, found from the annotations, so a new float flag is covered too.
  for field in dataclasses.fields(config):
    if field.type not in (float, float | None):
      continue
    value = getattr(config, field.name)
    if value is not None and not math.isfinite(value):
      raise ConfigError(f"--{field.name} must be a finite number, got {value}")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ConfigError(f"--{name}={value!r} is not one of {', '.join(allowed)}")


def _positive(name: str, value) -> None:
  if value <= 0:
    raise ConfigError(f"--{name} must be positive, got {value}")


# --mode=eval/export read a run: these settings may differ from the run's (where and how
# to evaluate or export); those in RUN_DEFINING must equal the run's, since they decide
# its network and checkpoint; every other setting (the recipe, ...) is the run's own.
# Where an evaluation runs is the evaluating command's, never the run's: a run trained on 2
# workers or 8 GPUs, or in mixed_bfloat16, evaluates on one CPU in float32 by default.
HARDWARE_FIELDS = ("strategy", "num_gpus", "tpu", "all_reduce", "peer_timeout_seconds",
                   "cpu_devices", "precision", "jit_compile", "steps_per_execution")
EVAL_OVERRIDES = ("mode", "model_dir", "checkpoint", "export_dir", "eval_flip", "eval_steps",
                  "data_source", "data_dir", "global_batch_size", *HARDWARE_FIELDS)
RUN_DEFINING = ("depth", "plain", "stem", "shortcut", "stage_sizes", "stage_widths",
                "ema_decay")


# Flags given as comma-separated lists; the Config holds tuples of integers.
INT_TUPLE_FIELDS = ("stage_sizes", "stage_widths", "profile_steps")


def training_values(flag_values: dict[str, tuple[object, bool]], recipe: dict) -> dict:
  """Each field's value for training: its flag's when given, else the recipe's, else the
  flag's default. One rule for the trainer and for scripts that check its runs up front.

  Args:
    flag_values: field -> (its flag's value, whether the flag was given).
    recipe: the recipe's field values (trainer/recipes.py).
  Raises:
    ConfigError: for a list flag whose items are not integers.
  """
  values = {}
  for field, (value, present) in flag_values.items():
    value = value if present or field not in recipe else recipe[field]
    if field in INT_TUPLE_FIELDS and value is not None:
      try:
        value = tuple(int(v) for v in value)
      except ValueError:
        raise ConfigError(f"--{field} must be comma-separated integers, got "
                          f"{','.join(value)}") from None
    values[field] = value
  return values


def for_existing_run(saved: dict, given: dict, source: str) -> tuple[Config, list[str]]:
  """The Config of an evaluation or export of a run: the run's settings (its config.json,
  `saved`), with the flags given explicitly where they may differ, and this command's
  hardware settings.

  Args:
    saved: the run's config.json.
    given: the flags given explicitly, as Config field values, and mode, model_dir and
      the HARDWARE_FIELDS whether given or not (their defaults).
    source: the path of config.json, for messages.
  Returns:
    the config, and the given flags that were ignored (training settings).
  Raises:
    ConfigError: when a given flag contradicts a setting that defines the run.
  """
  names = {field.name for field in dataclasses.fields(Config)}
  values = {name: tuple(v) if isinstance(v, list) else v
            for name, v in saved.items() if name in names}
  # The run's cap on its per-epoch evaluations is no cap on this one: an evaluation
  # covers the whole test split unless its own command caps it.
  values["eval_steps"] = None
  contradicting = [f"--{name}={flag_text(given[name])} (the run in {source} has "
                   f"--{name}={flag_text(values.get(name))})"
                   for name in RUN_DEFINING if name in given and given[name] != values.get(name)]
  if contradicting:
    raise ConfigError(f"{', '.join(contradicting)}: leave the flag out to use the run's "
                      "value")
  values.update({name: value for name, value in given.items() if name in EVAL_OVERRIDES})
  values.update(overwrite=False)
  ignored = sorted(name for name in given
                   if name not in EVAL_OVERRIDES and name not in RUN_DEFINING)
  return Config(**values), ignored


def flag_text(value) -> str:
  """A setting as it is written on the command line (tuples comma-separated)."""
  if isinstance(value, (tuple, list)):
    return ",".join(map(str, value))
  return str(value)
