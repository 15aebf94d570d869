"""A training run: `train_and_evaluate` reads as its steps (read the earlier run, load
data, plan, prepare the run dir, resolve the hardware, build the training, restore,
loop, write results). The loop and its actions are in loop.py and actions.py, the
training's state and step functions are built by training.py."""

import dataclasses
import secrets
import tempfile
import time

from absl import logging
import tensorflow as tf

from trainer import (data, distribute, hardware as hardware_lib, loop as loop_lib, run_dir,
                     schedule, training as training_lib)
from trainer.config import REFERENCE_BATCH_SIZE, Config
from trainer.state import State
from trainer.training import Hardware
from trainer.stop import StopRequest


@dataclasses.dataclass
class Outcome:
  """What a finished run leaves: its metrics (as in metrics.json), its trained state, and
  where this process wrote (the model dir, or a non-chief worker's removed scratch dir)."""
  metrics: dict
  state: State
  out_dir: str


def train_and_evaluate(config: Config, strategy: tf.distribute.Strategy,
                       stop_request: StopRequest | None = None,
                       record_batches: bool = False) -> dict:
  """Trains and evaluates the configured ResNet under `strategy`, resuming if possible.

  Args:
    config: the run's settings.
    strategy: where to run; the model and optimizer are built in its scope.
    stop_request: when given, the training loop listens to it: once requested, it saves a
      checkpoint at the next step boundary and raises Stopped.
    record_batches: append each step's global batch, as example ids (which example,
      which crop and flip: pipeline.example_ids), to <model_dir>/batches.jsonl, so that
      tests can check what a run trained on, across stops and resumes.
  Returns:
    the final metrics (also written to <model_dir>/metrics.json).
  Raises:
    errors.UserError: for settings, data or a run dir that cannot work; raised before
      anything is written to the model dir (but for checkpoints that cannot be restored).
    TrainingError: when the loss becomes NaN or Inf.
    Stopped: after a stop_request, once the checkpoint is saved.
  """
  return run_training(config, strategy, stop_request, record_batches).metrics


def run_training(config: Config, strategy: tf.distribute.Strategy,
                 stop_request: StopRequest | None = None,
                 record_batches: bool = False) -> Outcome:
  """train_and_evaluate, also returning the trained state (for tests and notebooks)."""
  if distribute.is_chief(strategy):
    return _train(config, strategy, config.model_dir, True, stop_request, record_batches)
  # Workers other than the chief write to a scratch dir of their own, removed however the
  # run ends: a failed worker's checkpoints would otherwise pile up in the temp dir.
  with tempfile.TemporaryDirectory(prefix="resnet-cifar-worker-",
                                   ignore_cleanup_errors=True) as scratch:
    return _train(config, strategy, scratch, False, stop_request, record_batches)


def _train(config: Config, strategy: tf.distribute.Strategy, out_dir: str, chief: bool,
           stop_request: StopRequest | None, record_batches: bool) -> Outcome:
  """The run, writing to `out_dir` (the model dir on the chief)."""
  wall_start = time.time()
  # The chief owns the model dir for the run's life; other workers write a scratch dir.
  with run_dir.claim(out_dir, lock=chief):
    _set_op_determinism(config.deterministic)
    earlier = run_dir.read_earlier_run(out_dir, ignore=config.overwrite)
    run_dir.check_settings(earlier, config)
    splits = data.load(config)
    plan = schedule.make_plan(config, replicas=strategy.num_replicas_in_sync,
                              num_train=splits.train.num_examples,
                              num_eval=splits.evaluation.num_examples,
                              num_test=splits.test.num_examples)
    run_dir.prepare(out_dir, config, earlier, _resolved_data(plan, splits))
    # What the chief's run dir recorded: every worker resumes as the chief does.
    chiefs = earlier if chief else run_dir.read_earlier_run(config.model_dir,
                                                            ignore=config.overwrite)
    hardware = hardware_lib.resolve(config, strategy, plan, len(splits.class_names),
                                    run_dir.recorded_precision(chiefs, config))
    run_dir.check_precision(earlier, hardware.precision)
    training = training_lib.build_training(
        config, strategy, plan, hardware, len(splits.class_names),
        record_steps=hardware.steps_per_execution if record_batches else 0)
    state = training.state
    run_dir.check_free_space(out_dir, state.checkpoint_bytes(), config.keep_checkpoints)
    checkpoints = run_dir.Checkpoints(
        state.checkpoint, out_dir, out_dir if chief or config.overwrite else config.model_dir,
        config.keep_checkpoints)
    start_step = _restore(checkpoints, state, plan)
    recorded_seed = run_dir.recorded_data_seed(chiefs, config)
    data_seed = _data_seed(config, strategy, recorded_seed)
    settings = {**dataclasses.asdict(config),
                **_resolved_settings(config, strategy, plan, hardware, splits, state),
                "data_seed_resolved": data_seed}
    if chief:  # Only now: a run that cannot restore its checkpoints writes nothing.
      run_dir.write_config(out_dir, settings)
    _log_plan(config, strategy, plan, hardware)
    logging.info("data order and augmentation: seed %d%s", data_seed,
                 "" if config.deterministic else " (drawn for this run)"
                 if recorded_seed is None else " (drawn when this run started)")
    loop = loop_lib.Loop(
        config, strategy, training, splits, checkpoints,
        loop_lib.RunPlace(out_dir, chief, start_step, wall_start, data_seed, earlier.history),
        stop_request)
    # One HParams session: its end records whether the run succeeded or failed.
    with loop.summaries.session(settings, start_step):
      loop.run()
      result = loop.final_metrics()
      if chief:
        run_dir.write_metrics(out_dir, result)
  return Outcome(result, state, out_dir)


def _resolved_settings(config: Config, strategy: tf.distribute.Strategy,
                       plan: schedule.Plan, hardware: Hardware, splits: data.Splits,
                       state: State) -> dict:
  """What config.json records beside the Config: the values "auto" and epochs became."""
  return {"strategy_resolved": type(strategy).__name__, "replicas": plan.replicas,
          "precision_resolved": hardware.precision,
          "jit_compile_resolved": hardware.jit_compile,
          "steps_per_execution_resolved": hardware.steps_per_execution,
          "per_replica_batch_size": plan.per_replica_batch_size,
          "scaled_learning_rate": config.scaled_learning_rate,
          "total_steps": plan.total_steps, "warmup_steps": plan.warmup_steps,
          "lr_boundaries_steps": list(plan.boundaries), "model": state.model.name,
          **_resolved_data(plan, splits)}


def _resolved_data(plan: schedule.Plan, splits: data.Splits) -> dict:
  """What the data resolved to (run_dir.RESOLVED_DATA): config.json records it, and a
  resumed run must find the same."""
  return {"train_examples": splits.train.num_examples,
          "steps_per_epoch_resolved": plan.steps_per_epoch,
          "class_names": list(splits.class_names)}


def _log_plan(config: Config, strategy: tf.distribute.Strategy, plan: schedule.Plan,
              hardware: Hardware) -> None:
  logging.info("recipe %s: %s schedule, %d steps (%.2f epochs of %d steps), warm-up %d "
               "steps%s; momentum %g%s, weight decay %g, label smoothing %g%s",
               config.recipe, config.lr_schedule, plan.total_steps, plan.total_epochs,
               plan.steps_per_epoch, plan.warmup_steps,
               f", /10 at steps {list(plan.boundaries)}" if plan.boundaries else "",
               config.momentum, " (Nesterov)" if config.nesterov else "",
               config.weight_decay, config.label_smoothing,
               f", clipnorm {config.clipnorm}" if config.clipnorm else "")
  if plan.warmup_steps >= plan.total_steps:
    logging.warning("the learning-rate warm-up (%d steps, --warmup_epochs=%g) covers the "
                    "whole run (%d steps): the rate only ever rises, and the run ends at its "
                    "peak. Lower --warmup_epochs or train more --epochs.", plan.warmup_steps,
                    config.warmup_epochs, plan.total_steps)
  logging.info("strategy %s, %d replica(s), precision %s, XLA %s, %d step(s) per "
               "execution, global batch %d (%d per replica), learning rate %.4g "
               "(%.4g x %d/%d)", type(strategy).__name__, plan.replicas, hardware.precision,
               "on" if hardware.jit_compile else "off", hardware.steps_per_execution,
               plan.global_batch_size, plan.per_replica_batch_size,
               config.scaled_learning_rate, config.learning_rate, config.global_batch_size,
               REFERENCE_BATCH_SIZE)


def _restore(checkpoints: run_dir.Checkpoints, state: State, plan: schedule.Plan) -> int:
  """Restores the newest readable checkpoint; returns the step to start from."""
  restored = checkpoints.restore_latest()
  start_step = int(state.step.numpy())
  if restored:
    logging.info("resumed from %s at step %d (epoch %.2f)", restored, start_step,
                 start_step / plan.steps_per_epoch)
  return start_step


def _set_op_determinism(enabled: bool) -> None:
  # Process-wide state: set it both ways, so one deterministic run (e.g. in a test
  # process) does not leave later runs deterministic (and without XLA max-pool gradients).
  from tensorflow.python.framework import config as tf_config  # No public "disable".
  if enabled:
    tf.config.experimental.enable_op_determinism()
  else:
    tf_config.disable_op_determinism()


def _data_seed(config: Config, strategy: tf.distribute.Strategy,
               recorded: int | None = None) -> int:
  """The seed of the data order and augmentation, the same in every input pipeline:
  --seed when deterministic, else drawn, by replica 0's process, and shared by one
  all-reduce (every pipeline slices the same permutation, see pipeline.train_pipeline).
  A resumed run passes the seed it drew when it started (`recorded`): with another, the
  interrupted epoch would go on in another order, repeating some examples and never
  reaching others."""
  if config.deterministic:
    return config.seed
  value = secrets.randbelow(2**24) if recorded is None else recorded
  drawn = tf.constant(float(value))  # Exact in float32 below 2**24.
  # In a tf.function: TPUs run strategy.run only there.
  share = tf.function(lambda: strategy.reduce(
      tf.distribute.ReduceOp.SUM, strategy.run(_replica_zero_only, args=(drawn,)), axis=None))
  return int(share().numpy())


def _replica_zero_only(value: tf.Tensor) -> tf.Tensor:
  """value on replica 0 (the chief's first), zeros elsewhere: summed, replica 0's value."""
  first = tf.distribute.get_replica_context().replica_id_in_sync_group == 0
  return tf.where(first, value, tf.zeros_like(value))
