"""Prints a ResNet's (or plain twin's) layout, trainable parameters and forward FLOPs.

Usage, from the repository root:
  .venv/bin/python scripts/model_summary.py --depth=56 [--plain] [--stem=imagenet]
      [--shortcut=B] [--stage_sizes=3,4,6,3] [--stage_widths=64,128,256,512]
  .venv/bin/python scripts/model_summary.py --all [--stem=...] [--shortcut=...]

The last line printed is JSON. For one network: an object with the keys family, depth,
weighted_layers, plain, block, stem, shortcut (null for plain nets), stage_sizes,
stage_widths, params (trainable parameters), flops (forward FLOPs per 32x32 image) and
output_shape. With --all: a list of such objects, residual then plain twin of every
depth in the table (ImageNet-style 18-152, CIFAR family 20-1202). FLOPs = 2 x the
multiply-accumulates of the convolution and dense layers (scripts/flops.py). --all builds
every network including ResNet-1202 and ResNet-152 and takes a few minutes on a 2-core
CPU.
"""

import json
import math
import os
import sys

# Runnable as `python scripts/model_summary.py` from anywhere: the repo root is one up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

# Pure Python: --help and flag errors answer without loading TensorFlow (describe does).
from trainer import architecture as architecture_lib, cli, flag_definitions  # noqa: E402

FLAGS = flags.FLAGS

# The trainer's flags of the architecture: the same names, meanings and defaults.
flag_definitions.define("depth", "plain", "stem", "shortcut", "stage_sizes", "stage_widths")
flags.DEFINE_boolean("all", False, "One table row per depth of the table (ImageNet-style "
                     "18-152 and CIFAR 20, 32, 44, 56, 110, 1202), residual and plain; "
                     "the last line is a JSON list with one object per network. Takes a "
                     "few minutes (it builds ResNet-1202 and ResNet-152).")

_SINGLE_NETWORK_FLAGS = ("depth", "plain", "stage_sizes", "stage_widths")
ALL_DEPTHS = (*architecture_lib.IMAGENET_DEPTHS, *architecture_lib.CIFAR_EXAMPLE_DEPTHS)
_FLOPS_NOTE = "FLOPs = 2 x multiply-accumulates of the convolution and dense layers"


def describe(arch: architecture_lib.Architecture) -> dict:
  """Builds the network and measures it.

  Args:
    arch: the architecture to build.
  Returns:
    the JSON-ready summary (keys as in the module docstring).
  """
  cli.import_tensorflow()
  import keras
  from scripts import flops
  from trainer import resnet
  model = resnet.build_model(arch)
  summary = {
      "family": arch.family,
      "depth": arch.depth,
      "weighted_layers": arch.weighted_layers,
      "plain": arch.plain,
      "block": arch.block,
      "stem": arch.stem,
      "shortcut": None if arch.plain else arch.shortcut,
      "stage_sizes": list(arch.stage_sizes),
      "stage_widths": list(arch.stage_widths),
      "params": sum(math.prod(w.shape) for w in model.trainable_weights),
      "flops": flops.forward_flops(model),
      "output_shape": list(model.output.shape),
  }
  # Frees the graph and the variables before the next (possibly huge) network.
  del model
  keras.backend.clear_session()
  return summary


def _int_list(name: str, values: list[str] | None) -> tuple[int, ...] | None:
  if values is None:
    return None
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise ValueError(f"--{name} must be comma-separated integers, got "
                     f"{','.join(values)}") from None


def _print_one(s: dict) -> None:
  expansion = (architecture_lib.BOTTLENECK_EXPANSION
               if s["block"] == architecture_lib.BOTTLENECK else 1)
  shortcut = {None: "none (plain twin)",
              "A": "A (strided identity + zero-padded channels, parameter-free)",
              "B": "B (1x1 projection + batch norm where the shape changes)"}[s["shortcut"]]
  rows = [
      ("network", f"{'Plain' if s['plain'] else 'ResNet'}-{s['depth']}"),
      ("family", {"imagenet": "ImageNet-style (He et al. Table 1)",
                  "cifar": "CIFAR (He et al. Sec. 4.2, 6n+2)"}[s["family"]]),
      ("depth", f"{s['depth']} ({s['weighted_layers']} weighted layers)"),
      ("plain", str(s["plain"]).lower()),
      ("block type", s["block"]),
      ("stem", s["stem"]),
      ("shortcut", shortcut),
      ("stage sizes", ", ".join(map(str, s["stage_sizes"]))),
      ("stage widths", ", ".join(map(str, s["stage_widths"]))
       + (f" (block outputs x{expansion})" if expansion > 1 else "")),
      ("trainable parameters", f"{s['params']:,} ({s['params'] / 1e6:.2f}M)"),
      ("forward FLOPs per 32x32 image", f"{s['flops']:,} ({s['flops'] / 1e9:.3f} G; "
       f"{_FLOPS_NOTE})"),
      ("output shape", f"(batch, {s['output_shape'][-1]}) float32 logits"),
  ]
  width = max(len(k) for k, _ in rows)
  for key, value in rows:
    print(f"{key:<{width}}  {value}")


def _print_all(stem: str, shortcut: str | None) -> list[dict]:
  header = (f"{'depth':>5}  {'family':<8}  {'block':<10}  {'stage sizes':<12}  "
            f"{'stage widths':<15}  {'params':>11}  {'GFLOPs':>7}  {'plain params':>12}  "
            f"{'plain GFLOPs':>12}")
  print(f"stem {stem}, shortcut {shortcut or 'A for CIFAR / B for ImageNet-style'}; "
        f"GFLOPs per 32x32 image, {_FLOPS_NOTE}")
  print(header)
  print("-" * len(header))
  summaries = []
  for depth in ALL_DEPTHS:
    twins = [describe(architecture_lib.architecture(depth, plain=plain, stem=stem,
                                          shortcut=shortcut))
             for plain in (False, True)]
    res, pl = twins
    print(f"{depth:>5}  {res['family']:<8}  {res['block']:<10}  "
          f"{','.join(map(str, res['stage_sizes'])):<12}  "
          f"{','.join(map(str, res['stage_widths'])):<15}  {res['params']:>11,}  "
          f"{res['flops'] / 1e9:>7.3f}  {pl['params']:>12,}  {pl['flops'] / 1e9:>12.3f}",
          flush=True)
    summaries.extend(twins)
  return summaries


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.all:
    clashing = [f"--{n}" for n in _SINGLE_NETWORK_FLAGS if FLAGS[n].present]
    if clashing:
      cli.fail(f"--all lists every depth, residual and plain; it takes no "
               f"{', '.join(clashing)}")
    try:
      architecture_lib.architecture(20, stem=FLAGS.stem, shortcut=FLAGS.shortcut)
    except ValueError as e:
      cli.fail(str(e))
    print(json.dumps(_print_all(FLAGS.stem, FLAGS.shortcut)))
    return
  try:
    arch = architecture_lib.architecture(
        FLAGS.depth, plain=FLAGS.plain, stem=FLAGS.stem, shortcut=FLAGS.shortcut,
        stage_sizes=_int_list("stage_sizes", FLAGS.stage_sizes),
        stage_widths=_int_list("stage_widths", FLAGS.stage_widths))
  except ValueError as e:
    cli.fail(str(e))
  summary = describe(arch)
  _print_one(summary)
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.script_parser)
