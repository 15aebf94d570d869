"""The run's one configuration object, and every setting declared once in it.

Each Config field is a setting's one declaration: its type, default, help, --help group,
allowed values and bounds, and its roles (whether a resumed run may change it, where an
evaluation takes it from, whether it is an HParam). The flags (trainer/flag_definitions.py),
their --help groups, the resume-compatibility check, the evaluation overrides, the checks
below and the HParams (trainer/summaries.py) are all derived from it; docs/flags.md is
checked against it (tests/test_docs.py). Built by trainer/main.py; frozen, typed, validated.
Pure Python: imports neither TensorFlow nor Keras.
"""

import dataclasses
import json
import math
from typing import Any

from trainer import architecture as architecture_lib
from trainer import recipes
from trainer.errors import ConfigError

DATA_SOURCES = ("tfds", "folder", "synthetic")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
MODES = ("train", "eval", "export")
RECIPE_NAMES = tuple(recipes.RECIPES)
DEFAULT_RECIPE = "fast"
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

# A setting's role when a run resumes. FIXED: a checkpoint cannot survive its change (the
# architecture, what maps steps to data: the training set, its split, the batches, and
# the shape of the learning-rate schedule over those steps), so a run dir keeps it.
# Everything else may change: --epochs (raising it continues a finished run), and
# --learning_rate (a lower one is the remedy a diverged run's error message names).
FIXED, MAY_CHANGE = "fixed", "may change"
# A setting's role in --mode=eval/export of a run. NETWORK: decides the run's network and
# checkpoint, so a given flag must equal the run's. COMMAND: where and how this command
# runs, always its own (its flag, else its default), never the run's: a run trained on 2
# workers, on GPUs or in mixed_bfloat16 evaluates on one CPU in float32 by default, and
# the run's --eval_steps cap is no cap on an evaluation. GIVEN: the command's flag when
# given, else the run's. RUN: the run's own (the recipe, ...); a given flag is ignored.
NETWORK, COMMAND, GIVEN, RUN = "network", "command", "given", "run"
GROUPS = ("model", "data", "recipe", "distribution", "run dir")


@dataclasses.dataclass(frozen=True)
class Setting:
  """What one setting's declaration says beyond its field's type and default."""
  group: str  # One of GROUPS: --help's, docs/flags.md's and the logged settings' group.
  help: str
  choices: tuple | None = None
  # Checked value >= minimum; for an integer without `below`, also its flag's lower bound.
  minimum: float | None = None
  above: float | None = None  # Checked value > above.
  below: float | None = None  # Checked value < below.
  resume: str = MAY_CHANGE
  evaluation: str = RUN
  hparam: str | None = None  # The HParam's description, for a setting that is one.
  recipe: bool = False  # Default from --recipe: a flag without a default of its own.
  recipe_none: str = "none"  # How a recipe's None reads in the help.


def setting(default: Any = None, **declaration) -> Any:
  """A Config field: `default`, and the Setting (keyword arguments) in its metadata. With
  recipe=True the default is the default recipe's value, filled in by _recipe_defaults."""
  return dataclasses.field(default=default, metadata={"setting": Setting(**declaration)})


def _recipe_defaults(cls):
  # Before @dataclass reads the defaults: the default recipe's values, written once in
  # trainer/recipes.py, are the defaults of the settings a recipe sets.
  for name, value in vars(cls).items():
    if isinstance(value, dataclasses.Field) and value.metadata["setting"].recipe:
      value.default = recipes.RECIPES[DEFAULT_RECIPE][name]
  return cls


@dataclasses.dataclass(frozen=True)
@_recipe_defaults
class Config:
  """Every setting of a run, in --help's order. Field names equal the flag names."""
  # Model.
  depth: int = setting(
      50, group="model", resume=FIXED, evaluation=NETWORK, hparam="--depth",
      help="ResNet depth: 18, 34, 50, 101, 152 (ImageNet-style, He et al. Table 1) or any "
      "6n+2 such as 20, 32, 44, 56, 110 (CIFAR family, He et al. Sec. 4.2).")
  plain: bool = setting(
      False, group="model", resume=FIXED, evaluation=NETWORK,
      hparam="--plain: no shortcut connections",
      help="Build the plain twin: the same layers without any shortcut connection.")
  stem: str = setting(
      "cifar", group="model", choices=architecture_lib.STEMS, resume=FIXED,
      evaluation=NETWORK, hparam="--stem",
      help="cifar: 3x3 stride-1 convolution; imagenet: 7x7 stride-2 convolution + 3x3 "
      "stride-2 max-pool.")
  shortcut: str | None = setting(
      None, group="model", choices=architecture_lib.SHORTCUTS, resume=FIXED,
      evaluation=NETWORK,
      help="A: parameter-free (strided identity, zero-padded channels); B: 1x1 projection "
      "where the shape changes. Default: A for the CIFAR family, B for ImageNet-style "
      "depths.")
  stage_sizes: tuple[int, ...] | None = setting(
      None, group="model", resume=FIXED, evaluation=NETWORK,
      help="Blocks per stage, overriding the depth table, e.g. 3,4,6,3.")
  stage_widths: tuple[int, ...] | None = setting(
      None, group="model", resume=FIXED, evaluation=NETWORK,
      help="Filters per stage, overriding the depth table, e.g. 64,128,256,512.")
  bn_momentum: float = setting(
      group="model", recipe=True, minimum=0, below=1,
      help="Batch-norm moving-average momentum (Keras's convention; Keras's own default is "
      "0.99).")
  zero_init_residual: bool = setting(
      False, group="model",
      help="Start the last batch-norm gamma of each residual branch at zero.")
  # Its on/off is fixed on resume (the EMA's variables are in the checkpoint): checked by
  # trainer/run_dir.py, since its value may change.
  ema_decay: float = setting(
      0.0, group="model", evaluation=NETWORK, minimum=0, below=1,
      help="Also evaluate an exponential moving average of the weights with this decay, "
      "e.g. 0.999 (0: off).")
  # Data.
  data_source: str = setting(
      "tfds", group="data", choices=DATA_SOURCES, resume=FIXED, evaluation=GIVEN,
      hparam="--data_source",
      help="tfds: tensorflow-datasets cifar10; folder: DATA_DIR/train/<class>/*.png|jpg and "
      "DATA_DIR/test/<class>/...; synthetic: random images.")
  data_dir: str | None = setting(
      None, group="data", evaluation=GIVEN,
      help="The TFDS data dir (tfds) or the image folder (folder).")
  synthetic_examples: tuple[int, ...] | None = setting(
      None, group="data", resume=FIXED, evaluation=GIVEN,
      help="--data_source=synthetic: TRAIN,TEST, the random images of each split, e.g. "
      "512,64 for a smoke run whose final evaluation takes no time; default: CIFAR-10's "
      "50000,10000.")
  validation_split: int = setting(
      0, group="data", resume=FIXED, minimum=0,
      help="Hold out this many training images (chosen by --seed) for the per-epoch "
      "evaluation (he2016 protocol: 5000); the test split is then evaluated once, at the "
      "end.")
  deterministic: bool = setting(
      False, group="data", resume=FIXED,
      help="Data order and augmentation from --seed (the same on every run), and "
      "deterministic TensorFlow ops: a killed and resumed run ends with bit-identical "
      "weights. Either way a resumed run trains on the batches of the uninterrupted run.")
  # NumPy's seeds (keras.utils.set_random_seed) are 32 bits.
  seed: int = setting(
      0, group="data", resume=FIXED, hparam="--seed", minimum=0, below=2**32,
      help="Seed of the initial weights, of the images --validation_split holds out and of "
      "synthetic data; with --deterministic also of the data order and augmentation, which "
      "are otherwise drawn for every new run (and logged: 'data order and augmentation: "
      "seed N (drawn for this run)') and kept when it resumes (config.json's "
      "data_seed_resolved). 0 to 2**32 - 1.")
  # Recipe and schedule. Epochs are converted to steps once, in trainer.schedule.make_plan.
  recipe: str = setting(
      DEFAULT_RECIPE, group="recipe", choices=RECIPE_NAMES, resume=FIXED, hparam="--recipe",
      help="fast: warm-up + cosine, Nesterov, label smoothing 0.1, 30 epochs; he2016: He et "
      "al. Sec. 4.2 (0.1, /10 at 32k and 48k iterations, 64k iterations, weight decay "
      "1e-4); blog: the origin blog post (SGD 0.01, clipnorm 1.0, 20 epochs). Every part "
      "stays overridable by its own flag.")
  epochs: int | None = setting(
      group="recipe", recipe=True, minimum=1,
      recipe_none="the paper's 64k iterations of 128 images", help="Training epochs.")
  steps_per_epoch: int | None = setting(
      None, group="recipe", resume=FIXED, minimum=1,
      help="Cap on steps per epoch (smoke runs); default: the whole training set.")
  global_batch_size: int = setting(
      128, group="recipe", resume=FIXED, evaluation=GIVEN, minimum=1,
      hparam="--global_batch_size", help="Examples per step over all replicas.")
  learning_rate: float = setting(
      group="recipe", recipe=True, above=0,
      hparam="--learning_rate (for a global batch of 128; scaled linearly)",
      help="Peak learning rate for a global batch of 128, scaled linearly with "
      "--global_batch_size.")
  lr_schedule: str = setting(
      group="recipe", recipe=True, choices=LR_SCHEDULES, resume=FIXED,
      help="cosine: linear warm-up then cosine decay to 0; he2016: /10 at 50% and 75% of "
      "training (the paper's 32k and 48k of 64k iterations); constant: the peak "
      "throughout.")
  warmup_epochs: float = setting(
      group="recipe", recipe=True, resume=FIXED, minimum=0,
      help="Learning-rate warm-up, in epochs: linear from 0 under cosine, a tenth of the "
      "peak under he2016 (which, at 0, warms up for 400 iterations at depth 110+), none "
      "under constant.")
  momentum: float = setting(
      group="recipe", recipe=True, minimum=0, help="SGD momentum, 0 for plain SGD.")
  nesterov: bool = setting(group="recipe", recipe=True, help="Nesterov momentum.")
  weight_decay: float = setting(
      group="recipe", recipe=True, minimum=0, hparam="--weight_decay",
      help="L2 regularisation: the objective adds 0.5 * weight_decay * (sum of the squared "
      "convolution and dense kernels), so their gradient gains weight_decay * w (coupled, "
      "through the momentum; not decoupled decay); never batch-norm parameters or biases.")
  label_smoothing: float = setting(
      group="recipe", recipe=True, minimum=0, below=1,
      help="Label smoothing of the objective (the reported loss is the plain "
      "cross-entropy).")
  clipnorm: float | None = setting(
      group="recipe", recipe=True, above=0,
      help="Clip each variable's gradient (summed over the replicas) to this norm.")
  eval_flip: bool = setting(
      False, group="recipe", evaluation=GIVEN,
      help="Also evaluate with left-right flip test-time augmentation (reported "
      "separately).")
  eval_steps: int | None = setting(
      None, group="recipe", evaluation=COMMAND, minimum=1,
      help="Cap on the per-epoch evaluation steps while training (--mode=eval: on its "
      "evaluation); default: the whole split. The final test metrics always cover the "
      "whole test split.")
  # Hardware: where and how a command runs.
  strategy: str = setting(
      "auto", group="distribution", choices=STRATEGIES, evaluation=COMMAND,
      help="auto: multi_worker under TF_CONFIG or a multi-task Slurm step (srun), else "
      "mirrored over 2+ GPUs, one_device on one GPU, default on CPU.")
  cpu_devices: int = setting(
      1, group="distribution", evaluation=COMMAND, minimum=1,
      help=f"Split the CPU into this many logical devices (at most {MAX_CPU_DEVICES}), to "
      "try --strategy=mirrored without GPUs.")
  num_gpus: int | None = setting(
      None, group="distribution", evaluation=COMMAND, minimum=1,
      help="--strategy=mirrored: use this many local GPUs (default: all).")
  tpu: str | None = setting(
      None, group="distribution", evaluation=COMMAND,
      help="--strategy=tpu: the TPU name or grpc:// address, or 'local'.")
  all_reduce: str = setting(
      "auto", group="distribution", choices=ALL_REDUCE, evaluation=COMMAND,
      help="Cross-device reduction. mirrored: auto = NCCL on GPUs, reduction_to_one_device "
      "on CPUs; multi_worker: auto, nccl or ring.")
  peer_timeout_seconds: int = setting(
      300, group="distribution", evaluation=COMMAND, minimum=1,
      help="multi_worker: fail with a clear message when the peers cannot be reached "
      "within this time; --tpu: when the TPU does not answer within it.")
  precision: str = setting(
      "auto", group="distribution", choices=PRECISIONS, evaluation=COMMAND,
      help="auto: mixed_bfloat16 on GPUs of compute capability 8+, mixed_float16 on 7.x; on "
      "CPU float32, or mixed_bfloat16 where a run of 1000+ steps (not --deterministic) "
      "measures it 1.15x faster for its network; a resumed run keeps its precision.")
  jit_compile: str = setting(
      "auto", group="distribution", choices=JIT_COMPILE, evaluation=COMMAND,
      help="XLA for the per-replica step; auto: on for GPUs, off on CPU.")
  steps_per_execution: int | None = setting(
      None, group="distribution", evaluation=COMMAND, minimum=1,
      help="Training steps per call into TensorFlow (fewer host round-trips; calls still "
      "end at every log, checkpoint and epoch boundary). Default: 100 on GPUs and TPUs, 1 "
      "on CPU.")
  sync_batch_norm: bool = setting(
      False, group="distribution",
      help="Batch-norm statistics over all replicas (for small per-replica batches).")
  # Output.
  mode: str = setting(
      "train", group="run dir", choices=MODES, evaluation=COMMAND,
      help="train: train with per-epoch evaluation (resumes from --model_dir); eval: "
      "evaluate a checkpoint on the test split; export: write a SavedModel and a .keras "
      "file.")
  model_dir: str = setting(
      "runs/resnet", group="run dir", evaluation=COMMAND,
      help="Where checkpoints, TensorBoard events, config.json and metrics.json go; "
      "rerunning with the same dir resumes.")
  overwrite: bool = setting(
      False, group="run dir",
      help="Delete the run in --model_dir (checkpoints, logs, metrics) and start afresh, "
      "e.g. after changing the architecture.")
  checkpoint: str | None = setting(
      None, group="run dir", evaluation=GIVEN,
      help="--mode=eval/export: 'latest', 'best' or a checkpoint path prefix (default: "
      "latest; export of a run with --validation_split: best, i.e. the best by validation "
      "accuracy).")
  export_dir: str | None = setting(
      None, group="run dir", evaluation=GIVEN,
      help="--mode=export: where to write (default: MODEL_DIR/export).")
  log_every_steps: int = setting(
      100, group="run dir", minimum=1,
      help="Console and TensorBoard training metrics every N steps.")
  checkpoint_every_steps: int = setting(
      1000, group="run dir", minimum=1,
      help="Checkpoint every N steps (and at every epoch end).")
  keep_checkpoints: int = setting(
      3, group="run dir", minimum=1, help="Rolling checkpoints kept.")
  profile_steps: tuple[int, ...] | None = setting(
      None, group="run dir",
      help="START,END: write a profiler trace of these training steps (view it in "
      "TensorBoard's Profile tab).")

  def __post_init__(self):
    # First: nan passes every `< 0` and range check below, and inf passes most of them.
    _check_finite_floats(self)
    _check_declared(self)
    try:
      self.architecture()
    except ValueError as e:
      raise ConfigError(f"--depth/--stem/--shortcut/--stage_*: {e}") from None
    if self.cpu_devices > MAX_CPU_DEVICES:
      raise ConfigError(f"--cpu_devices must be at most {MAX_CPU_DEVICES}, got "
                        f"{self.cpu_devices}: logical CPU devices are for trying replicas "
                        "without GPUs (or one per core), and every replica traces its own "
                        "copy of the step, so start-up time grows with their number")
    if self.epochs is None and self.lr_schedule != "he2016":
      raise ConfigError("--epochs is needed unless --lr_schedule=he2016 (whose default "
                        "length is the paper's 64k iterations)")
    if self.data_source == "folder" and not self.data_dir:
      raise ConfigError("--data_source=folder needs --data_dir=DIR holding DIR/train/<class>/ "
                        "and DIR/test/<class>/ image folders")
    if self.synthetic_examples is not None:
      _check_synthetic_examples(self)
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


def _check_synthetic_examples(config: Config) -> None:
  sizes = config.synthetic_examples
  if config.data_source != "synthetic":
    raise ConfigError(f"--synthetic_examples is for --data_source=synthetic, not "
                      f"--data_source={config.data_source}")
  if len(sizes) != 2 or min(sizes) < 1:
    raise ConfigError(f"--synthetic_examples must be TRAIN,TEST, two positive integers, "
                      f"got {flag_text(sizes)}")


def _check_declared(config: Config) -> None:
  # What each setting's declaration allows: its choices and bounds (None: unset).
  for name, declared in SETTINGS.items():
    value = getattr(config, name)
    if value is None:
      continue
    if declared.choices is not None and value not in declared.choices:
      raise ConfigError(f"--{name}={value!r} is not one of {', '.join(declared.choices)}")
    if not _within(value, declared):
      raise ConfigError(f"--{name} must be {_bounds_text(declared)}, got {value}")


def _within(value, declared: Setting) -> bool:
  return ((declared.minimum is None or value >= declared.minimum)
          and (declared.above is None or value > declared.above)
          and (declared.below is None or value < declared.below))


def _bounds_text(declared: Setting) -> str:
  if declared.below is not None:
    return f"in [{_number_text(declared.minimum)}, {_number_text(declared.below)})"
  if declared.above == 0 or declared.minimum == 1:
    return "positive"
  return f">= {_number_text(declared.minimum)}"


def _number_text(value: float) -> str:
  if isinstance(value, int) and value > 2**16 and value & (value - 1) == 0:
    return f"2**{value.bit_length() - 1}"  # 2**32, not 4294967296.
  return f"{value:g}"


# Each setting's declaration (dataclass field metadata), by field name, in --help's order.
SETTINGS: dict[str, Setting] = {field.name: field.metadata["setting"]
                                for field in dataclasses.fields(Config)}


def fields_where(**roles) -> tuple[str, ...]:
  """The settings whose declaration has these values, e.g. fields_where(resume=FIXED)."""
  return tuple(name for name, declared in SETTINGS.items()
               if all(getattr(declared, key) == value for key, value in roles.items()))


def groups() -> dict[str, tuple[str, ...]]:
  """Group -> its settings, in --help's order."""
  return {group: fields_where(group=group) for group in GROUPS}


# The settings of each role (see FIXED and NETWORK above).
RESUME_FIXED = fields_where(resume=FIXED)
RUN_DEFINING = fields_where(evaluation=NETWORK)
EVAL_COMMAND = fields_where(evaluation=COMMAND)
EVAL_OVERRIDES = (*fields_where(evaluation=GIVEN), *EVAL_COMMAND)
# Flags given as comma-separated lists; the Config holds tuples of integers.
INT_TUPLE_FIELDS = tuple(field.name for field in dataclasses.fields(Config)
                         if field.type == tuple[int, ...] | None)


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
    given: the flags given explicitly, as Config field values, and the EVAL_COMMAND
      settings whether given or not (their defaults).
    source: the path of config.json, for messages.
  Returns:
    the config, and the given flags that were ignored (training settings).
  Raises:
    ConfigError: when a given flag contradicts a setting that defines the run.
  """
  names = {field.name for field in dataclasses.fields(Config)}
  values = {name: tuple(v) if isinstance(v, list) else v
            for name, v in saved.items() if name in names}
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
