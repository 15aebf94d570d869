"""The trainer's flags, each defined once: name, type, default, allowed values and help.

trainer/main.py defines all of them; a script that takes some of the same flags defines
those from here as well (`define("depth", "plain", defaults={"depth": 20})`), so a flag
name means one thing everywhere. Defining is not reading: trainer/main.py stays the only
trainer module that reads flag values. docs/flags.md documents these flags and
tests/test_docs.py holds the two equal. Pure Python: imports neither TensorFlow nor Keras.
"""

import dataclasses
from typing import Any, Callable

from absl import flags

from trainer import architecture
from trainer import config as config_lib

# The flags defined through `define` belong to its caller (absl's key flags: what a
# script's --help lists), not to this module.
flags.disclaim_key_flags()


@dataclasses.dataclass(frozen=True)
class _Flag:
  define: Callable[..., Any]   # flags.DEFINE_integer, ...
  default: Any
  help: str
  options: dict = dataclasses.field(default_factory=dict)  # enum_values, lower_bound


def _enum(default, values, help_text):
  return _Flag(flags.DEFINE_enum, default, help_text, {"enum_values": list(values)})


def _integer(default, help_text, lower_bound=None):
  return _Flag(flags.DEFINE_integer, default, help_text, {"lower_bound": lower_bound})


_RECIPE = "Default: from --recipe"

# In trainer/main.py's order; --help groups them as console.SETTING_GROUPS does.
DEFINITIONS: dict[str, _Flag] = {
    "mode": _enum("train", config_lib.MODES,
                  "train: train with per-epoch evaluation (resumes from --model_dir); eval: "
                  "evaluate a checkpoint on the test split; export: write a SavedModel and "
                  "a .keras file."),
    # Model.
    "depth": _integer(50, "ResNet depth: 18, 34, 50, 101, 152 (ImageNet-style, He et al. "
                      "Table 1) or any 6n+2 such as 20, 32, 44, 56, 110 (CIFAR family, He "
                      "et al. Sec. 4.2)."),
    "plain": _Flag(flags.DEFINE_boolean, False, "Build the plain twin: the same layers "
                   "without any shortcut connection."),
    "stem": _enum("cifar", architecture.STEMS, "cifar: 3x3 stride-1 convolution; imagenet: "
                  "7x7 stride-2 convolution + 3x3 stride-2 max-pool."),
    "shortcut": _enum(None, architecture.SHORTCUTS, "A: parameter-free (strided identity, "
                      "zero-padded channels); B: 1x1 projection where the shape changes. "
                      "Default: A for the CIFAR family, B for ImageNet-style depths."),
    "stage_sizes": _Flag(flags.DEFINE_list, None, "Blocks per stage, overriding the depth "
                         "table, e.g. 3,4,6,3."),
    "stage_widths": _Flag(flags.DEFINE_list, None, "Filters per stage, overriding the depth "
                          "table, e.g. 64,128,256,512."),
    "bn_momentum": _Flag(flags.DEFINE_float, None, "Batch-norm moving-average momentum "
                         f"(Keras's convention; Keras's own default is 0.99). {_RECIPE} "
                         "(fast 0.9, he2016 0.9, blog 0.99)."),
    "zero_init_residual": _Flag(flags.DEFINE_boolean, False, "Start the last batch-norm "
                                "gamma of each residual branch at zero."),
    # Data.
    "data_source": _enum("tfds", config_lib.DATA_SOURCES,
                         "tfds: tensorflow-datasets cifar10; folder: "
                         "DATA_DIR/train/<class>/*.png|jpg and DATA_DIR/test/<class>/...; "
                         "synthetic: random images."),
    "data_dir": _Flag(flags.DEFINE_string, None, "The TFDS data dir (tfds) or the image "
                      "folder (folder)."),
    "deterministic": _Flag(flags.DEFINE_boolean, False, "Data order and augmentation from "
                           "--seed (the same on every run), and deterministic TensorFlow "
                           "ops: a killed and resumed run ends with bit-identical weights. "
                           "Either way a resumed run trains on the batches of the "
                           "uninterrupted run."),
    # Recipe and schedule.
    "recipe": _enum("fast", config_lib.RECIPE_NAMES,
                    "fast: warm-up + cosine, Nesterov, label smoothing 0.1, 30 epochs; "
                    "he2016: He et al. Sec. 4.2 (0.1, /10 at 32k and 48k iterations, 64k "
                    "iterations, weight decay 1e-4); blog: the origin blog post (SGD 0.01, "
                    "clipnorm 1.0, 20 epochs). Every part stays overridable by its own "
                    "flag."),
    "epochs": _integer(None, f"Training epochs. {_RECIPE} (fast 30, he2016 the paper's 64k "
                       "iterations of 128 images, blog 20).", lower_bound=1),
    "steps_per_epoch": _integer(None, "Cap on steps per epoch (smoke runs); default: the "
                                "whole training set.", lower_bound=1),
    "eval_steps": _integer(None, "Cap on the per-epoch evaluation steps while training "
                           "(--mode=eval: on its evaluation); default: the whole split. The "
                           "final test metrics always cover the whole test split.",
                           lower_bound=1),
    "global_batch_size": _integer(128, "Examples per step over all replicas.",
                                  lower_bound=1),
    "learning_rate": _Flag(flags.DEFINE_float, None, "Peak learning rate for a global batch "
                           "of 128, scaled linearly with --global_batch_size. "
                           f"{_RECIPE} (fast 0.1, he2016 0.1, blog 0.01)."),
    "lr_schedule": _enum(None, config_lib.LR_SCHEDULES,
                         "cosine: linear warm-up then cosine decay to 0; he2016: /10 at 50% "
                         "and 75% of training (the paper's 32k and 48k of 64k iterations); "
                         f"constant: the peak throughout. {_RECIPE} (fast cosine, he2016 "
                         "he2016, blog constant)."),
    "warmup_epochs": _Flag(flags.DEFINE_float, None, "Learning-rate warm-up, in epochs: "
                           "linear from 0 under cosine, a tenth of the peak under he2016 "
                           "(which, at 0, warms up for 400 iterations at depth 110+), none "
                           f"under constant. {_RECIPE} (fast 2, he2016 0, blog 0)."),
    "momentum": _Flag(flags.DEFINE_float, None, "SGD momentum, 0 for plain SGD. "
                      f"{_RECIPE} (fast 0.9, he2016 0.9, blog 0)."),
    "nesterov": _Flag(flags.DEFINE_boolean, None, "Nesterov momentum. "
                      f"{_RECIPE} (fast true, he2016 false, blog false)."),
    "weight_decay": _Flag(flags.DEFINE_float, None, "L2 regularisation: the objective adds "
                          "0.5 * weight_decay * (sum of the squared convolution and dense "
                          "kernels), so their gradient gains weight_decay * w (coupled, "
                          "through the momentum; not decoupled decay); never batch-norm "
                          f"parameters or biases. {_RECIPE} (fast 1e-3, he2016 1e-4, "
                          "blog 0)."),
    "label_smoothing": _Flag(flags.DEFINE_float, None, "Label smoothing of the objective "
                             "(the reported loss is the plain cross-entropy). "
                             f"{_RECIPE} (fast 0.1, he2016 0, blog 0)."),
    "clipnorm": _Flag(flags.DEFINE_float, None, "Clip each variable's gradient (summed over "
                      f"the replicas) to this norm. {_RECIPE} (fast none, he2016 none, blog "
                      "1.0)."),
    "ema_decay": _Flag(flags.DEFINE_float, 0.0, "Also evaluate an exponential moving "
                       "average of the weights with this decay, e.g. 0.999 (0: off)."),
    "eval_flip": _Flag(flags.DEFINE_boolean, False, "Also evaluate with left-right flip "
                       "test-time augmentation (reported separately)."),
    "validation_split": _integer(0, "Hold out this many training images (chosen by --seed) "
                                 "for the per-epoch evaluation (he2016 protocol: 5000); "
                                 "the test split is then evaluated once, at the end.",
                                 lower_bound=0),
    # Hardware.
    "strategy": _enum("auto", config_lib.STRATEGIES,
                      "auto: multi_worker under TF_CONFIG or a multi-task Slurm step (srun), "
                      "else mirrored over 2+ GPUs, one_device on one GPU, default on CPU."),
    "num_gpus": _integer(None, "--strategy=mirrored: use this many local GPUs (default: "
                         "all).", lower_bound=1),
    "tpu": _Flag(flags.DEFINE_string, None, "--strategy=tpu: the TPU name or grpc:// "
                 "address, or 'local'."),
    "all_reduce": _enum("auto", config_lib.ALL_REDUCE,
                        "Cross-device reduction. mirrored: auto = NCCL on GPUs, "
                        "reduction_to_one_device on CPUs; multi_worker: auto, nccl or "
                        "ring."),
    "peer_timeout_seconds": _integer(300, "multi_worker: fail with a clear message when "
                                     "the peers cannot be reached within this time; --tpu: "
                                     "when the TPU does not answer within it.",
                                     lower_bound=1),
    "sync_batch_norm": _Flag(flags.DEFINE_boolean, False, "Batch-norm statistics over all "
                             "replicas (for small per-replica batches)."),
    "cpu_devices": _integer(1, "Split the CPU into this many logical devices (at most "
                            f"{config_lib.MAX_CPU_DEVICES}), to try --strategy=mirrored "
                            "without GPUs.", lower_bound=1),
    "precision": _enum("auto", config_lib.PRECISIONS,
                       "auto: mixed_bfloat16 on GPUs of compute capability 8+, "
                       "mixed_float16 on 7.x; on CPU float32, or mixed_bfloat16 where a "
                       "run of 1000+ steps (not --deterministic) measures it 1.15x "
                       "faster for its network; a resumed run keeps its precision."),
    "jit_compile": _enum("auto", config_lib.JIT_COMPILE,
                         "XLA for the per-replica step; auto: on for GPUs, off on CPU."),
    "steps_per_execution": _integer(None, "Training steps per call into TensorFlow (fewer "
                                    "host round-trips; calls still end at every log, "
                                    "checkpoint and epoch boundary). Default: 100 on GPUs "
                                    "and TPUs, 1 on CPU.", lower_bound=1),
    # Output.
    "model_dir": _Flag(flags.DEFINE_string, "runs/resnet", "Where checkpoints, TensorBoard "
                       "events, config.json and metrics.json go; rerunning with the same "
                       "dir resumes."),
    "overwrite": _Flag(flags.DEFINE_boolean, False, "Delete the run in --model_dir "
                       "(checkpoints, logs, metrics) and start afresh, e.g. after changing "
                       "the architecture."),
    "checkpoint": _Flag(flags.DEFINE_string, None, "--mode=eval/export: 'latest', 'best' or "
                        "a checkpoint path prefix (default: latest; export of a run with "
                        "--validation_split: best, i.e. the best by validation accuracy)."),
    "export_dir": _Flag(flags.DEFINE_string, None, "--mode=export: where to write (default: "
                        "MODEL_DIR/export)."),
    "profile_steps": _Flag(flags.DEFINE_list, None, "START,END: write a profiler trace of "
                           "these training steps (view it in TensorBoard's Profile tab)."),
    "log_every_steps": _integer(100, "Console and TensorBoard training metrics every N "
                                "steps.", lower_bound=1),
    "checkpoint_every_steps": _integer(1000, "Checkpoint every N steps (and at every epoch "
                                       "end).", lower_bound=1),
    "keep_checkpoints": _integer(3, "Rolling checkpoints kept.", lower_bound=1),
    "tf_logs": _Flag(flags.DEFINE_boolean, False, "Show TensorFlow's C++ start-up and "
                     "device messages (hidden by default)."),
    "seed": _integer(0, "Seed of the initial weights, of the images --validation_split "
                     "holds out and of synthetic data; with --deterministic also of the "
                     "data order and augmentation, which are otherwise drawn for every new "
                     "run (and logged: 'data order and augmentation: seed N (drawn for this "
                     "run)') and kept when it resumes (config.json's data_seed_resolved). 0 to "
                     "2**32 - 1."),
}


def define(*names: str, defaults: dict | None = None, notes: dict | None = None,
           flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines these trainer flags (all of them when none is named) for the caller.

  Args:
    names: flag names, keys of DEFINITIONS.
    defaults: a script's own defaults for some of them (name -> value).
    notes: text added to a flag's help (name -> text), e.g. what a script does with it.
    flag_values: where to define them.
  """
  defaults, notes = defaults or {}, notes or {}
  for name in names or DEFINITIONS:
    flag = DEFINITIONS[name]
    help_text = f"{flag.help} {notes[name]}" if name in notes else flag.help
    options = {key: value for key, value in flag.options.items() if value is not None}
    flag.define(name, defaults.get(name, flag.default), help=help_text,
                flag_values=flag_values, **options)
