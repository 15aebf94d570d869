"""Command-line entrypoint: `python -m trainer.main --depth=50 --plain=false ...`.

The only module that reads absl flags: flags -> one validated Config -> strategy ->
train, eval or export -> exit code.
"""

import contextlib
import gc
import os
import re
import signal
import textwrap

from absl import app, flags, logging

from trainer import config as config_lib
from trainer import cli, errors, flag_definitions, run_files, stop

FLAGS = flags.FLAGS
# For tests, not users: set to 1, a training run records each step's global batch (example
# ids) in <model_dir>/batches.jsonl, to check what it trained on across stops and resumes.
RECORD_BATCHES_VARIABLE = "RESNET_CIFAR_RECORD_BATCHES"

# Every flag, defined once in trainer/flag_definitions.py (some scripts share them).
flag_definitions.define()


def config_from_flags(notes: list[str] | None = None) -> config_lib.Config:
  """Builds the Config from the parsed flags (flag names equal field names).

  Training: a field takes its flag's value when the flag was given, else the recipe's
  value, else the flag's default. --mode=eval/export of an existing run: the run's own
  settings (its config.json), with the given flags where they may differ.

  Args:
    notes: receives the warnings about the settings, for the console once it is set up
      (logged at once without it).
  """
  warn = logging.warning if notes is None else notes.append
  from trainer import recipes
  flag_values = {field: (FLAGS[field].value, FLAGS[field].present)
                 for field in config_lib.Config.__dataclass_fields__}
  values = config_lib.training_values(flag_values, recipes.RECIPES[FLAGS.recipe])
  given = {field: values[field] for field, (_, present) in flag_values.items()
           if present or field in config_lib.EVAL_COMMAND}
  saved_path = os.path.join(FLAGS.model_dir, run_files.CONFIG_FILE)
  if FLAGS.mode == "train":
    return config_lib.Config(**values)
  if not os.path.exists(saved_path):
    config = config_lib.Config(**values)
    warn(f"--mode={FLAGS.mode}: no {saved_path} (the run's settings); the flags' settings "
         f"stand in: {_architecture_and_data(config)}; pass the run's own if they differ")
    return config
  config, ignored = config_lib.for_existing_run(
      run_files.read_json(saved_path, "the run's settings"), given, saved_path)
  if ignored:
    warn(f"--mode={FLAGS.mode} uses the run's own settings from {saved_path}; ignored: "
         + ", ".join(f"--{name}" for name in ignored))
  return config


def _architecture_and_data(config: config_lib.Config) -> str:
  """The flags that decide what a checkpoint fits and what it is evaluated on."""
  names = (*config_lib.RUN_DEFINING, "data_source", "data_dir")
  return " ".join(f"--{name}={_flag_text(getattr(config, name))}" for name in names
                  if getattr(config, name) is not None)


def _flag_text(value) -> str:
  if isinstance(value, bool):
    return str(value).lower()
  return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _stop(handler: stop.SignalHandler, signum: int, message: str) -> None:
  """Ends the run after Ctrl-C or SIGTERM; exit status 130 or 143 as a shell reports them.

  A short step can return before the notice thread runs: wait for it (briefly), so the
  notice never comes after the error line.
  """
  handler.announced.wait(timeout=1.0)
  reason, code = stop.STOPS[signum]
  cli.fail(f"{reason}{message}", code=code)


def _stop_signal(e: BaseException) -> int | None:
  """The signal behind a stop: a KeyboardInterrupt (or stop.Terminated), also when it was
  raised inside a pybind11 call, which wraps it (seen while TensorFlow joined a cluster:
  "RuntimeError: pybind11::error_already_set: MISMATCH ... UnavailableError REPLACED BY
  Terminated"). None for any other error."""
  if isinstance(e, KeyboardInterrupt):
    return stop.signal_of(e)
  wrapped = re.search(r"REPLACED BY (Terminated|KeyboardInterrupt)\b", str(e))
  if wrapped is None:
    return None
  return signal.SIGTERM if wrapped.group(1) == "Terminated" else signal.SIGINT


def _export(config: config_lib.Config) -> str:
  from trainer import export, run_dir
  # Not into a run dir a trainer is writing (the export dir is inside it by default).
  lock = (run_dir.RunLock(config.model_dir) if os.path.isdir(config.model_dir)
          else contextlib.nullcontext())
  with lock:
    result = export.export(config)
  return (f"exported {result['checkpoint']}, {result['chosen_by']}, to "
          f"{result['saved_model']} and {result['keras']}")


def _evaluate(config: config_lib.Config, strategy) -> str:
  """--mode=eval: prints the result, then writes eval.json (a read-only run dir still
  shows the result before the error)."""
  from trainer import distribute, evaluation, run_dir
  result = evaluation.evaluate_checkpoint(config, strategy)
  # --eval_flip and an EMA add test_flip_accuracy, test_ema_accuracy, ...
  extras = "".join(f", {key[len('test_'):].replace('_', ' ')} {value:.4f}"
                   for key, value in result.items()
                   if key.startswith("test_") and key.endswith("_accuracy")
                   and key != "test_accuracy" and isinstance(value, float))
  print(f"eval: {result['model']} {result['checkpoint']} (step {result['step']}): "
        f"test accuracy {result['test_accuracy']:.4f}, loss {result['test_loss']:.4f}"
        f"{extras} on {_examples(result['examples'], result['split_examples'])}", flush=True)
  if not distribute.is_chief(strategy):
    return "the chief writes eval.json"
  run_dir.write_eval(config.model_dir, result)
  return f"written to {os.path.join(config.model_dir, run_files.EVAL_FILE)}"


def _examples(examples: int, split_examples: int) -> str:
  if examples == split_examples:
    return f"all {examples} test images"
  return f"{examples} of the {split_examples} test images (capped by --eval_steps)"


def _train(config: config_lib.Config, strategy, handler: stop.SignalHandler) -> str:
  from trainer import distribute, train
  # Under multi_worker the signal goes on to TensorFlow's preemption handler, and every
  # worker saves at one agreed step (stop.ClusterStop).
  metrics = train.train_and_evaluate(
      config, strategy, handler.listen(),
      record_batches=os.environ.get(RECORD_BATCHES_VARIABLE, "") not in ("", "0"))
  where = (f"metrics in {os.path.join(config.model_dir, run_files.METRICS_FILE)}"
           if distribute.is_chief(strategy) else "the chief wrote the metrics")
  # No speed when no step was timed (all of them in the first, traced, call).
  speed = (f", {metrics['images_per_second']:.1f} training images/s"
           if metrics["images_per_second"] else "")
  # The final test metrics cover the whole test split, whatever --eval_steps capped.
  return (f"done: {metrics['model']} test accuracy {metrics['test_accuracy']:.4f} on all "
          f"{metrics['test_examples']} test images after "
          f"{metrics['epochs']} epochs ({metrics['steps']} steps) in "
          f"{metrics['wall_seconds']:.0f} s{speed}; {where}")


def _check_cpu_devices_used(cpu_devices: int, strategy) -> None:
  """Warns when --cpu_devices split the CPU for nothing: only MirroredStrategy on a machine
  without GPUs trains on the logical CPUs (default, one_device, multi_worker and GPUs do
  not), which a user asking for N of them would otherwise not learn."""
  import tensorflow as tf
  if cpu_devices > 1 and not (isinstance(strategy, tf.distribute.MirroredStrategy)
                              and strategy.num_replicas_in_sync == cpu_devices):
    logging.warning("--cpu_devices=%d has no effect here: %s trains on %d replica(s); "
                    "only --strategy=mirrored on a machine without GPUs trains on "
                    "the logical CPUs", cpu_devices, type(strategy).__name__,
                    strategy.num_replicas_in_sync)


def _run(config: config_lib.Config, handler: stop.SignalHandler, notes: list[str]) -> str:
  """Runs the mode; returns the line that reports its result."""
  from trainer import console, distribute
  log_file = console.configure(config.model_dir if config.mode == "train" else None)
  logging.info("%s", console.settings_block(config))
  for note in notes:
    logging.warning("%s", note)
  if config.mode != "train" and not FLAGS.tf_logs:
    import tensorflow as tf
    tf.get_logger().setLevel("ERROR")  # Checkpoint-reading chatter is not the user's news.
  distribute.configure_cpu_devices(config.cpu_devices)
  if config.mode == "export":
    return _export(config)
  strategy = distribute.make_strategy(
      config.strategy, num_gpus=config.num_gpus, tpu=config.tpu,
      all_reduce=config.all_reduce, peer_timeout_seconds=config.peer_timeout_seconds)
  # MultiWorkerMirroredStrategy's coordination service puts in TensorFlow's own SIGTERM
  # handler (a preemption notifier this trainer does not use), which swallows the signal
  # and lets training run on until the scheduler's SIGKILL; take it back.
  handler.take_sigterm()
  _check_cpu_devices_used(config.cpu_devices, strategy)
  if log_file is not None and not distribute.is_chief(strategy):
    console.detach(log_file)  # Only the chief writes into --model_dir.
  if config.mode == "eval":
    return _evaluate(config, strategy)
  return _train(config, strategy, handler)


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  handler = stop.SignalHandler()
  handler.install()
  try:
    # The Config is pure Python: a bad setting is reported before TensorFlow loads.
    notes = []
    config = config_from_flags(notes)
    cli.import_tensorflow(FLAGS.tf_logs)
    import tensorflow as tf
  except errors.UserError as e:
    cli.fail(str(e))
  except KeyboardInterrupt as e:
    _stop(handler, stop.signal_of(e), " while starting up; nothing was written")
  try:
    print(_run(config, handler, notes))
    # Everything is written and flushed. The interpreter's last garbage collection at exit
    # walks every TensorFlow and Keras object: 0.8 s of each command (a smoke run takes 7),
    # measured on the 2-core AMD EPYC VM; frozen, they are left to the exit (0.1 s).
    gc.freeze()
  except errors.UserError as e:
    cli.fail(str(e))
  except errors.TrainingError as e:
    cli.fail(str(e), code=1)
  except stop.Stopped as e:
    if e.checkpoint is None:
      _stop(handler, e.signum, " before the first step; no checkpoint was written")
    _stop(handler, e.signum, f"; saved {e.checkpoint} (step {e.step}): rerun the same "
          "command to resume from it")
  except (KeyboardInterrupt, RuntimeError) as e:
    # Raised where no training loop listens (set-up, --mode=eval, multi-worker, the last
    # writes), wherever it landed, so nothing is saved here; checkpoints are written
    # atomically, so the last one is intact.
    signum = _stop_signal(e)
    if signum is None:
      raise
    where = os.path.join(config.model_dir, run_files.CHECKPOINT_SUBDIR)
    _stop(handler, signum, f"; checkpoints in {where} are intact: rerun the same command "
          "to resume from the last one")
  except (tf.errors.UnavailableError, tf.errors.AbortedError,
          tf.errors.DeadlineExceededError) as e:
    from trainer import distribute
    cluster = distribute.joined_cluster()
    if cluster is None:
      raise
    # A collective op failed because a peer died or became unreachable mid-run.
    logging.info("the collective op failed with: %s", e.message)
    cli.fail(f"a peer worker was lost during training ({type(e).__name__}: "
             f"{errors.root_cause(e.message)}); {cluster.restart_hint}: the run resumes from the "
             "chief's last checkpoint", code=1)


USAGE = """Train a ResNet (or its plain twin) on CIFAR-10, evaluate it, or export it.

usage:
  python -m trainer.main --depth=20 --data_source=folder --data_dir=DIR --model_dir=runs/r20
  python -m trainer.main --mode=eval --model_dir=runs/r20      # the run's own settings
  python -m trainer.main --mode=export --model_dir=runs/r20
Rerunning a training command resumes it from its last checkpoint.
Exit codes: 0 done, 1 diverged or a peer lost, 2 bad settings, data or run dir,
130 Ctrl-C, 143 SIGTERM (both save a checkpoint first)."""


def _help_text() -> str:
  """USAGE, then the flags grouped as docs/flags.md groups them (the settings' groups)."""
  lines = [USAGE]
  for group, names in flag_definitions.HELP_GROUPS.items():
    lines.append(f"\n{group}:")
    for name in names:
      flag = FLAGS[name]
      default = "" if flag.default is None else f" (default: {flag.default_as_str.strip(chr(39))})"
      lines.append(f"  --{name}{default}")
      lines += textwrap.wrap(flag.help, 88, initial_indent="      ",
                             subsequent_indent="      ")
  lines.append("\n--helpfull also lists absl's own flags (logging, flagfile).")
  return "\n".join(lines)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing in the project's format (cli.parse); --help prints the usage and the
  grouped flags."""
  return cli.parse(argv, _help_text, USAGE)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
