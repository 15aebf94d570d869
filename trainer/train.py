"""The training loop: `train_and_evaluate` reads as its steps (load data, plan, prepare the
run dir, build state, restore, loop, write results); `Loop` owns the cadence of training
calls, logs, checkpoints and per-epoch evaluation (the step functions are in steps.py)."""

import dataclasses
import math
import os
import secrets
import signal
import tempfile
import time

from absl import logging
import numpy as np
import tensorflow as tf

from input_pipeline import pipeline
from trainer import (data, distribute, evaluation, metrics, precision_probe, run_dir, run_files,
                     schedule, steps, summaries)
from trainer.config import REFERENCE_BATCH_SIZE, Config
from trainer.errors import ConfigError, RunDirError, TrainingError
from trainer.state import State, build_state, per_replica_variables
from trainer import stop
from trainer.stop import StopRequest, Stopped


# Weights whose norm grows this many times between two checks (log steps, checkpoints)
# have diverged even while finite: a sane step changes the norm by a few percent, and a
# checkpoint of exploded weights would only diverge again on resume.
WEIGHT_NORM_GROWTH_LIMIT = 100.0


@dataclasses.dataclass(frozen=True)
class Hardware:
  """The strategy-dependent settings, resolved from their "auto" values."""
  precision: str
  jit_compile: bool
  steps_per_execution: int


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
    if not config.overwrite:
      # Settings that contradict the run are refused before the data loads: that can take
      # a minute, or fail on its own and hide the contradiction (a rerun with a typo).
      run_dir.check_compatible(out_dir, config, resolved={}, report_changes=False)
    splits = data.load(config)
    plan = schedule.make_plan(config, replicas=strategy.num_replicas_in_sync,
                              num_train=splits.train.num_examples,
                              num_eval=splits.evaluation.num_examples,
                              num_test=splits.test.num_examples)
    run_dir.prepare(out_dir, config, _resolved_data(plan, splits))
    hardware = resolve_hardware(config, strategy, plan, len(splits.class_names),
                                run_dir.recorded_precision(config))
    run_dir.check_precision(out_dir, hardware.precision)
    state = build_state(config, strategy, len(splits.class_names), plan, hardware.precision)
    run_dir.check_free_space(out_dir, state.checkpoint_bytes(), config.keep_checkpoints)
    checkpoints = run_dir.Checkpoints(
        state.checkpoint, out_dir, out_dir if chief or config.overwrite else config.model_dir,
        config.keep_checkpoints)
    start_step = _restore(checkpoints, state, plan)
    recorded_seed = run_dir.recorded_data_seed(config)
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
    loop = Loop(config, strategy, state, splits, plan, hardware, checkpoints,
                RunPlace(out_dir, chief, start_step, wall_start, data_seed), stop_request,
                record_batches)
    # One HParams session: its end records whether the run succeeded or failed.
    with loop.summaries.session(settings, start_step):
      loop.run()
      result = loop.final_metrics(loop.final_test())
      if chief:
        run_dir.write_metrics(out_dir, result)
  return Outcome(result, state, out_dir)


def resolve_hardware(config: Config, strategy: tf.distribute.Strategy,
                     plan: schedule.Plan | None = None, num_classes: int = 0,
                     recorded_precision: str | None = None) -> Hardware:
  """Resolves --precision, --jit_compile and --steps_per_execution for the strategy.

  Args:
    plan, num_classes: a training run's; with them, --precision=auto on a CPU times the
      run's network at float32 and mixed_bfloat16 when the run is long enough
      (distribute.choose_cpu_precision); without (benchmarks), it is float32 there.
    recorded_precision: what a resumed auto run resolved to (run_dir.recorded_precision),
      kept on a CPU: its precision must not change with a timing mid-way.
  Raises:
    ConfigError: for --deterministic with XLA on the imagenet stem (also when "auto"
      chose XLA, as on a GPU).
    DistributionError: for a precision policy this CPU cannot run, and for XLA with
      --sync_batch_norm on several CPU replicas.
  """
  jit_compile = distribute.resolve_jit_compile(config.jit_compile, strategy)
  # Before --precision=auto's probe: a refused run should not wait for a measurement.
  distribute.check_jit_compile_runs(jit_compile, config.sync_batch_norm, strategy)
  cpu_run = None if plan is None else distribute.CpuRun(
      network=config.architecture().name, total_steps=plan.total_steps,
      deterministic=config.deterministic, recorded=recorded_precision,
      seconds_per_step=lambda: precision_probe.seconds_per_step(
          config, strategy, plan.per_replica_batch_size, num_classes, jit_compile))
  hardware = Hardware(
      precision=distribute.resolve_precision(config.precision, strategy, cpu_run),
      jit_compile=jit_compile,
      steps_per_execution=distribute.resolve_steps_per_execution(
          config.steps_per_execution, strategy))
  if config.deterministic and hardware.jit_compile and config.stem == "imagenet":
    raise ConfigError(f"--deterministic cannot be combined with XLA (--jit_compile="
                      f"{config.jit_compile}, on here) for --stem=imagenet: XLA has no "
                      "deterministic max-pool gradient; pass --jit_compile=false")
  distribute.check_precision_runs(hardware.precision, strategy)
  return hardware


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


@dataclasses.dataclass(frozen=True)
class RunPlace:
  """Where and when this process's part of the run happens."""
  out_dir: str       # the model dir on the chief, a scratch dir on other workers
  chief: bool
  start_step: int    # the restored step (0 for a new run)
  wall_start: float  # time.time() when this process started the run
  data_seed: int     # of the data order from start_step on (see _data_seed)


class Loop:
  """The cadence of a run: calls into TensorFlow that end at every log step, checkpoint
  step, epoch end and profiler boundary; there it logs, saves, evaluates, or stops on a
  StopRequest (always where the step counter and the weights agree)."""

  def __init__(self, config: Config, strategy: tf.distribute.Strategy, state: State,
               splits: data.Splits, plan: schedule.Plan, hardware: Hardware,
               checkpoints: run_dir.Checkpoints, place: RunPlace,
               stop_request: StopRequest | None, record_batches: bool = False):
    self.config, self.strategy, self.state, self.plan = config, strategy, state, plan
    self.splits, self.hardware, self.checkpoints = splits, hardware, checkpoints
    self.place, self.stop_request = place, stop_request
    self.steps = steps.TrainSteps(
        config, strategy, state, len(splits.class_names), hardware.jit_compile,
        record_steps=hardware.steps_per_execution if record_batches else 0)
    self.iterator = iter(strategy.distribute_datasets_from_function(self._train_dataset))
    # Keras 3 batch norm updates each replica's moving statistics on its own batch only;
    # averaging the copies (and their moving averages) before every evaluation and save
    # keeps the replicas (and the workers' checkpoints) equal.
    self.sync_replicas = distribute.make_replica_sync(strategy,
                                                      per_replica_variables(state))
    self.evaluator = evaluation.make_evaluator(strategy, state, splits.evaluation, plan,
                                               config, plan.eval_steps)
    # Multi-worker: a signal to any worker stops every worker at one agreed step.
    self.cluster_stop = (
        stop.ClusterStop(strategy, stop_request, self._save_before_stopping, self._stopped)
        if stop_request is not None and _is_multi_worker(strategy) else None)
    self.summaries = summaries.Summaries(place.out_dir, splits.evaluation_name, place.chief,
                                         splits.class_names)
    # Epochs after the restored checkpoint were lost with the crash: forget them.
    self.history = [h for h in run_dir.read_history(place.out_dir)
                    if h["step"] <= place.start_step]
    self.best_accuracy = max((h[f"{splits.evaluation_name}_accuracy"] for h in self.history),
                             default=-1.0)
    self.previous_wall = float(state.wall_seconds.numpy())
    self.step = self.saved_step = self.interval_step = place.start_step
    # The last step whose weights were checked finite, and their norm then.
    self.finite_step, self.weight_norm = place.start_step, state.health()[1]
    self.interval_start = time.time()
    self.first_call = True
    self.profiling_from: int | None = None  # the step the running profiler trace began at
    self.epoch_means = metrics.EpochMeans()
    # (step, results) of this process's last per-epoch evaluation.
    self.evaluated: tuple[int, dict] = (-1, {})

  def _train_dataset(self, input_context: tf.distribute.InputContext) -> tf.data.Dataset:
    return pipeline.train_pipeline(
        self.splits.train.as_dataset(), per_replica_batch_size=self.plan.per_replica_batch_size,
        seed=self.place.data_seed, start_step=self.place.start_step,
        input_context=input_context, with_ids=self.steps.record_steps > 0)

  def run(self) -> None:
    """Trains from the restored step to the plan's last step."""
    logging.info("training %s for %.2f epochs (%d steps) from step %d", self.state.model.name,
                 self.plan.total_epochs, self.plan.total_steps, self.place.start_step)
    self._listen(True)
    while self.step < self.plan.total_steps:
      self._stop_if_requested()
      epoch_end = self._epoch_end()
      self._train_until(self._next_boundary(epoch_end))
      if self.step % self.config.log_every_steps == 0 or self.step == epoch_end:
        self._log_interval(epoch_end)
      if self.step == epoch_end:
        self._end_epoch()
      elif self.step % self.config.checkpoint_every_steps == 0:
        self._save()
    self._stop_if_requested()
    # From here on a signal raises at once: what is left is writing metrics.json.
    self._listen(False)
    self._check_finite()

  def _listen(self, listening: bool) -> None:
    if self.stop_request is not None:
      self.stop_request.listening = listening

  def _epoch_end(self) -> int:
    # An epoch ends every steps_per_epoch steps, and at the last step (he2016 schedules
    # need not end on an epoch boundary).
    per_epoch = self.plan.steps_per_epoch
    return min((self.step // per_epoch + 1) * per_epoch, self.plan.total_steps)

  def _next_boundary(self, epoch_end: int) -> int:
    step, config = self.step, self.config
    boundaries = [epoch_end, step + self.hardware.steps_per_execution,
                  (step // config.log_every_steps + 1) * config.log_every_steps,
                  (step // config.checkpoint_every_steps + 1) * config.checkpoint_every_steps]
    if config.profile_steps:
      boundaries += [b for b in config.profile_steps if b > step]
    return min(boundaries)

  def _train_until(self, until: int) -> None:
    """One call into TensorFlow: steps self.step + 1 .. until."""
    profile = self.config.profile_steps
    trace_dir = os.path.join(self.place.out_dir, run_files.TRAIN_EVENTS)
    # Also when a resumed run starts inside the window: it traces the rest of it.
    if (profile and self.place.chief and self.profiling_from is None
        and profile[0] <= self.step < profile[1]):
      if self.step > profile[0]:
        logging.info("--profile_steps=%d,%d began before step %d, where this run resumed: "
                     "tracing steps %d-%d", *profile, self.step, self.step, profile[1])
      tf.profiler.experimental.start(trace_dir)
      self.profiling_from = self.step
    call_start = time.time()
    self.steps.run(self.iterator, tf.constant(self.step, tf.int64),
                   tf.constant(until - self.step, tf.int64))
    if self.first_call:
      # The first call traces and compiles; it is left out of the throughput figures.
      self.first_call = False
      self.interval_start, self.interval_step = time.time(), until
    else:
      self.state.timed_images.assign_add((until - self.step) * self.config.global_batch_size)
      self.state.timed_seconds.assign_add(time.time() - call_start)
    if self.steps.record_steps:
      batches = self.steps.recorded_ids(self.step, until)
      if self.place.chief:
        run_dir.append_batches(self.place.out_dir, batches)
    self.step = until
    if self.profiling_from is not None and self.step == profile[1]:
      tf.profiler.experimental.stop()
      logging.info("profiler trace of steps %d-%d written under %s", self.profiling_from,
                   profile[1], os.path.join(trace_dir, "plugins", "profile"))
      self.profiling_from = None

  def _log_interval(self, epoch_end: int) -> None:
    """Training metrics of the steps since the last log: TensorBoard and the console."""
    self._check_finite()
    means, count = self.steps.sums.result(), self.steps.sums.examples()
    self.steps.sums.reset()
    self.epoch_means.add(means, count)
    seconds = time.time() - self.interval_start
    timed = self.step > self.interval_step
    images_per_second = ((self.step - self.interval_step) * self.config.global_batch_size
                         / seconds if timed else float("nan"))
    learning_rate = float(self.state.optimizer.learning_rate.numpy())
    self.summaries.train_interval(
        self.step, means, learning_rate, self.steps.gradient_norms(),
        seconds / (self.step - self.interval_step) if timed else None, images_per_second)
    remaining = (self.plan.total_steps - self.step) * self.config.global_batch_size
    # The first step of a process (its tracing) is not timed: no speed to show yet.
    speed = (f"{images_per_second:.1f} images/s eta "
             f"{_duration(remaining / images_per_second)}" if images_per_second > 0
             else "(speed: the first call is not timed)")
    logging.info("epoch %.2f step %d/%d %s lr %.4g %s",
                 self.step / self.plan.steps_per_epoch, self.step, self.plan.total_steps,
                 " ".join(f"{k} {v:.4f}" for k, v in means.items()), learning_rate, speed)
    self.interval_start, self.interval_step = time.time(), self.step

  def _end_epoch(self) -> None:
    """Evaluates, records the epoch (history.json, TensorBoard), saves, keeps the best."""
    name, step = self.splits.evaluation_name, self.step
    epoch = step / self.plan.steps_per_epoch
    split_size = self.splits.evaluation.num_examples
    planned = min(self.plan.eval_steps * self.plan.global_batch_size, split_size)
    logging.info("evaluating on %d %s images%s", planned, name,
                 "" if planned == split_size else f" of {split_size} (--eval_steps)")
    self.sync_replicas()
    results = self.evaluator.evaluate()
    confusion, examples = self.evaluator.confusion, self.evaluator.examples
    self.evaluated = (step, results)
    train_means = self.epoch_means.result()
    self.epoch_means = metrics.EpochMeans()
    record = {"epoch": round(epoch, 4), "step": step,
              **{f"train_{k}": v for k, v in train_means.items()},
              **{f"{name}_{k}": v for k, v in results.items()},
              f"{name}_examples": examples,
              f"{name}_per_class_accuracy": metrics.per_class_accuracy(
                  confusion, self.splits.class_names)}
    self.history.append(record)
    self.summaries.epoch(step, train_means, results, confusion)
    logging.info("epoch %.2f train loss %.4f accuracy %.4f, %s %s (%s)", epoch,
                 record["train_loss"], record["train_accuracy"], name,
                 " ".join(f"{k} {v:.4f}" for k, v in results.items()),
                 f"all {examples} images" if examples == split_size else
                 f"{examples} of {split_size} images: --eval_steps")
    if self.place.chief:
      run_dir.write_history(self.place.out_dir, self.history)
    self._save()
    if results["accuracy"] > self.best_accuracy:
      self.best_accuracy = results["accuracy"]
      self.checkpoints.save_best(step)
    self.interval_start = time.time()

  def _check_finite(self) -> None:
    """Raises TrainingError once the loss or any weight is NaN or Inf; the last checkpoint
    is then the last finite one, since nothing is saved without this check."""
    bad = self.steps.first_non_finite_step()
    finite, norm = self.state.health()
    if bad:
      what = f"the training loss became NaN or Inf at step {bad}"
    elif not finite or not math.isfinite(norm):
      what = (f"the weights became NaN or Inf between step {self.finite_step} and step "
              f"{self.step} (the loss was still finite)")
    elif norm > WEIGHT_NORM_GROWTH_LIMIT * self.weight_norm:
      what = (f"the weights exploded between step {self.finite_step} and step {self.step} "
              f"(their norm grew from {self.weight_norm:.3g} to {norm:.3g})")
    else:
      self.finite_step, self.weight_norm = self.step, norm
      return
    latest = self.checkpoints.latest
    resume = (f"The last good checkpoint is {latest}: rerun (e.g. with a lower "
              "--learning_rate or a longer --warmup_epochs) to resume from it."
              if latest else "No checkpoint was saved: a rerun starts from step 0 (e.g. "
              "with a lower --learning_rate or a longer --warmup_epochs).")
    raise TrainingError(
        f"{what} (learning rate "
        f"{float(self.state.optimizer.learning_rate.numpy()):.4g} at step {self.step}); "
        f"stopped without saving. {resume}")

  def _save(self) -> None:
    self._check_finite()
    self.sync_replicas()
    self.state.step.assign(self.step)
    self.state.wall_seconds.assign(self._wall_seconds())
    try:
      self.checkpoints.save(self.step)
    except (tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError,
            OSError) as e:
      reason = getattr(e, "message", None) or str(e)
      raise RunDirError(
          f"could not save the checkpoint of step {self.step} ({type(e).__name__}: "
          f"{reason.splitlines()[0][:200]}). The last good checkpoint is "
          f"{self.checkpoints.latest or 'none'}: free some space (or fix the permissions), "
          "then rerun to resume from it.") from None
    self.saved_step = self.step

  def _wall_seconds(self) -> float:
    return self.previous_wall + time.time() - self.place.wall_start

  def _stop_if_requested(self) -> None:
    # Called only where the step and the model agree (between calls into TensorFlow, after
    # their bookkeeping), so the checkpoint resumes exactly there.
    if self.cluster_stop is not None:
      self.cluster_stop.check()  # Every worker, at every boundary: they agree on a step.
      return
    if self.stop_request is None or self.stop_request.signum is None:
      return
    self._save_before_stopping()
    self._stopped()

  def _save_before_stopping(self) -> None:
    if self.step != self.saved_step:
      logging.info("saving a checkpoint at step %d before stopping", self.step)
      self._save()

  def _stopped(self) -> None:
    # A worker that was not signalled itself stops as for SIGTERM: the cluster's.
    signum = self.stop_request.signum or signal.SIGTERM
    saved = os.path.join(self.config.model_dir, run_files.CHECKPOINT_SUBDIR,
                         f"ckpt-{self.saved_step}") if self.saved_step else None
    raise Stopped(signum, self.step, self.checkpoints.latest if self.place.chief else saved)

  def final_test(self) -> dict:
    """The test split's metrics at the end, always over all of it: the last epoch's
    evaluation when it covered the whole test split at this step; else evaluated now
    (after a validation protocol or under an --eval_steps cap, or for a rerun of a
    finished run). With examples, per_class_accuracy and confusion_matrix."""
    evaluator = self.evaluator
    if self.splits.evaluation_name == run_files.TEST_EVENTS:
      if self.evaluated[0] == self.step and evaluator.examples == self.splits.test.num_examples:
        final = dict(self.evaluated[1])
      else:  # The epoch evaluator, uncapped (no second trace of its loop).
        self.sync_replicas()
        final = evaluator.evaluate(self.plan.test_steps)
    else:
      self.sync_replicas()
      evaluator = evaluation.make_evaluator(self.strategy, self.state, self.splits.test,
                                            self.plan, self.config, self.plan.test_steps)
      final = evaluator.evaluate()
    confusion = evaluator.confusion
    self.summaries.final_test(self.step, final, confusion)
    final["examples"] = evaluator.examples
    final["per_class_accuracy"] = metrics.per_class_accuracy(confusion,
                                                             self.splits.class_names)
    final["confusion_matrix"] = confusion.tolist()
    self.summaries.flush()
    return final

  def final_metrics(self, final: dict) -> dict:
    """metrics.json: the final test metrics, the history and how the run went."""
    state, history = self.state, self.history
    images, seconds = float(state.timed_images.numpy()), float(state.timed_seconds.numpy())
    result = {
        **{f"test_{k}": v for k, v in final.items()},
        "best_test_accuracy": max([h.get("test_accuracy", -1.0) for h in history]
                                  + [final["accuracy"]]),
        "epochs": round(self.step / self.plan.steps_per_epoch, 4),
        "steps": self.step,
        "global_batch_size": self.config.global_batch_size,
        "wall_seconds": self._wall_seconds(),
        "images_per_second": images / seconds if seconds else None,
        "resumed_from_step": self.place.start_step,
        "replicas": self.plan.replicas,
        "precision": self.hardware.precision,
        "jit_compile": self.hardware.jit_compile,
        "recipe": self.config.recipe,
        "model": state.model.name,
        "trainable_parameters": int(sum(v.numpy().size for v in state.model.trainable_variables)),
        "history": history,
    }
    if self.config.validation_split:
      result["best_validation_accuracy"] = self.best_accuracy
    result.update(self._export_default())
    result["most_confused"] = metrics.most_confused(np.array(final["confusion_matrix"]),
                                                    self.splits.class_names)
    logging.info("classes confused most (true -> predicted: test examples): %s",
                 ", ".join(f"{t} -> {p}: {n}" for t, p, n in result["most_confused"])
                 or "none")
    self.summaries.best_test_accuracy(self.step, result["best_test_accuracy"])
    return result

  def _export_default(self) -> dict:
    """metrics.json's record of what --mode=export exports by default, and why."""
    which, _ = run_dir.export_default(self.config.validation_split)
    accuracy = f"{self.splits.evaluation_name}_accuracy"
    # best/ holds the first epoch that reached the best accuracy (_end_epoch saves on >).
    best_step = next((h["step"] for h in self.history if h[accuracy] == self.best_accuracy),
                     None)
    if which == "best" and best_step is not None:
      return {"export_checkpoint": f"{run_files.BEST_SUBDIR}/ckpt-{best_step}",
              "export_checkpoint_chosen_by": "best_validation_accuracy"}
    return {"export_checkpoint": f"{run_files.CHECKPOINT_SUBDIR}/ckpt-{self.step}",
            "export_checkpoint_chosen_by": "final"}


def _is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
  resolver = getattr(strategy, "cluster_resolver", None)
  return bool(resolver is not None and resolver.cluster_spec().jobs)


def _duration(seconds: float) -> str:
  if seconds != seconds:
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
