"""What the training loop (loop.py) does at its boundaries, each in an object of its own:
the divergence guard, checkpoints, the training log, the profiler window, the per-epoch
evaluation and the stop protocol. The loop calls them where the step counter and the
weights agree (between calls into TensorFlow); each keeps the state it needs."""

import math
import os
import signal
import time

from absl import logging
import tensorflow as tf

from trainer import evaluation, metrics, run_dir, run_files, schedule, stop, summaries
from trainer.config import Config
from trainer.errors import RunDirError, TrainingError
from trainer.state import State
from trainer.steps import TrainSteps
from trainer.stop import StopRequest, Stopped

# Weights whose norm grows this many times between two checks (log steps, checkpoints)
# have diverged even while finite: a sane step changes the norm by a few percent, and a
# checkpoint of exploded weights would only diverge again on resume.
WEIGHT_NORM_GROWTH_LIMIT = 100.0


class RunClock:
  """The run's wall time over all its processes: what the earlier ones recorded in the
  checkpoint, and this one's since it started."""

  def __init__(self, state: State, started: float):
    self.previous, self.started = float(state.wall_seconds.numpy()), started

  def seconds(self) -> float:
    return self.previous + time.time() - self.started


class DivergenceGuard:
  """Raises TrainingError once the loss or any weight is NaN or Inf, or the weights
  exploded; nothing is saved without this check, so the last checkpoint is the last
  finite one."""

  def __init__(self, state: State, steps: TrainSteps, checkpoints: run_dir.Checkpoints,
               start_step: int):
    self.state, self.steps, self.checkpoints = state, steps, checkpoints
    # The last step whose weights were checked finite, and their norm then.
    self.finite_step, self.weight_norm = start_step, state.health()[1]

  def check(self, step: int) -> None:
    bad = self.steps.first_non_finite_step()
    finite, norm = self.state.health()
    if bad:
      what = f"the training loss became NaN or Inf at step {bad}"
    elif not finite or not math.isfinite(norm):
      what = (f"the weights became NaN or Inf between step {self.finite_step} and step "
              f"{step} (the loss was still finite)")
    elif norm > WEIGHT_NORM_GROWTH_LIMIT * self.weight_norm:
      what = (f"the weights exploded between step {self.finite_step} and step {step} "
              f"(their norm grew from {self.weight_norm:.3g} to {norm:.3g})")
    else:
      self.finite_step, self.weight_norm = step, norm
      return
    latest = self.checkpoints.latest
    resume = (f"The last good checkpoint is {latest}: rerun (e.g. with a lower "
              "--learning_rate or a longer --warmup_epochs) to resume from it."
              if latest else "No checkpoint was saved: a rerun starts from step 0 (e.g. "
              "with a lower --learning_rate or a longer --warmup_epochs).")
    raise TrainingError(
        f"{what} (learning rate "
        f"{float(self.state.optimizer.learning_rate.numpy()):.4g} at step {step}); "
        f"stopped without saving. {resume}")


class Checkpointer:
  """Saves the state at a step, once the guard passed it and the replicas' batch-norm
  statistics agree; keeps the best by the per-epoch evaluation apart."""

  def __init__(self, state: State, checkpoints: run_dir.Checkpoints, guard: DivergenceGuard,
               sync_replicas, clock: RunClock, start_step: int):
    self.state, self.checkpoints, self.guard = state, checkpoints, guard
    self.sync_replicas, self.clock = sync_replicas, clock
    self.saved_step = start_step

  def save(self, step: int) -> None:
    self.guard.check(step)
    self.sync_replicas()
    self.state.step.assign(step)
    self.state.wall_seconds.assign(self.clock.seconds())
    try:
      self.checkpoints.save(step)
    except (tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError,
            OSError) as e:
      reason = getattr(e, "message", None) or str(e)
      raise RunDirError(
          f"could not save the checkpoint of step {step} ({type(e).__name__}: "
          f"{reason.splitlines()[0][:200]}). The last good checkpoint is "
          f"{self.checkpoints.latest or 'none'}: free some space (or fix the permissions), "
          "then rerun to resume from it.") from None
    self.saved_step = step

  def save_best(self, step: int) -> None:
    self.checkpoints.save_best(step)


class TrainingLog:
  """Training metrics of the steps since the last log, to TensorBoard and the console;
  the epoch's training means; the throughput, timed over every call but a process's first
  (it traces and compiles)."""

  def __init__(self, config: Config, plan: schedule.Plan, state: State, steps: TrainSteps,
               summaries_: summaries.Summaries, guard: DivergenceGuard, start_step: int):
    self.config, self.plan, self.state, self.steps = config, plan, state, steps
    self.summaries, self.guard = summaries_, guard
    self.interval_start, self.interval_step = time.time(), start_step
    self.first_call = True
    self.epoch_means = metrics.EpochMeans()

  def timed(self, step: int, until: int, call_start: float) -> None:
    """Counts the call of steps step + 1 .. until, begun at call_start, in the throughput."""
    if self.first_call:
      self.first_call = False
      self.interval_start, self.interval_step = time.time(), until
    else:
      self.state.timed_images.assign_add((until - step) * self.config.global_batch_size)
      self.state.timed_seconds.assign_add(time.time() - call_start)

  def log(self, step: int) -> None:
    self.guard.check(step)
    means, count = self.steps.sums.result(), self.steps.sums.examples()
    self.steps.sums.reset()
    self.epoch_means.add(means, count)
    seconds = time.time() - self.interval_start
    timed = step > self.interval_step
    images_per_second = ((step - self.interval_step) * self.config.global_batch_size
                         / seconds if timed else float("nan"))
    learning_rate = float(self.state.optimizer.learning_rate.numpy())
    self.summaries.train_interval(
        step, means, learning_rate, self.steps.gradient_norms(),
        seconds / (step - self.interval_step) if timed else None, images_per_second)
    remaining = (self.plan.total_steps - step) * self.config.global_batch_size
    # The first step of a process (its tracing) is not timed: no speed to show yet.
    speed = (f"{images_per_second:.1f} images/s eta "
             f"{_duration(remaining / images_per_second)}" if images_per_second > 0
             else "(speed: the first call is not timed)")
    logging.info("epoch %.2f step %d/%d %s lr %.4g %s",
                 step / self.plan.steps_per_epoch, step, self.plan.total_steps,
                 " ".join(f"{k} {v:.4f}" for k, v in means.items()), learning_rate, speed)
    self.restart_interval(step)

  def restart_interval(self, step: int) -> None:
    self.interval_start, self.interval_step = time.time(), step

  def take_epoch_means(self) -> dict[str, float]:
    means = self.epoch_means.result()
    self.epoch_means = metrics.EpochMeans()
    return means


class Profiler:
  """--profile_steps=START,END: a profiler trace of those steps, written by the chief; a
  run resumed inside the window traces the rest of it."""

  def __init__(self, profile_steps: tuple[int, int] | None, chief: bool, out_dir: str):
    self.window, self.chief = profile_steps, chief
    self.trace_dir = os.path.join(out_dir, run_files.TRAIN_EVENTS)
    self.started_at: int | None = None  # the step the running trace began at

  def boundaries(self, step: int) -> list[int]:
    return [b for b in self.window or () if b > step]

  def before_call(self, step: int) -> None:
    start, end = self.window or (0, 0)
    if not (self.chief and self.started_at is None and start <= step < end):
      return
    if step > start:
      logging.info("--profile_steps=%d,%d began before step %d, where this run resumed: "
                   "tracing steps %d-%d", start, end, step, step, end)
    tf.profiler.experimental.start(self.trace_dir)
    self.started_at = step

  def after_call(self, step: int) -> None:
    if self.started_at is None or step != self.window[1]:
      return
    tf.profiler.experimental.stop()
    logging.info("profiler trace of steps %d-%d written under %s", self.started_at, step,
                 os.path.join(self.trace_dir, "plugins", "profile"))
    self.started_at = None


class EpochEvaluation:
  """At every epoch end: evaluates on the evaluation split (test, or validation), records
  the epoch (history.json, TensorBoard, the console), saves, and keeps the best; at the
  end, the test split's final metrics, always over all of it."""

  def __init__(self, config: Config, strategy: tf.distribute.Strategy, state: State,
               plan: schedule.Plan, splits, summaries_: summaries.Summaries,
               checkpointer: Checkpointer, training_log: TrainingLog, sync_replicas,
               history: list[dict], chief: bool, out_dir: str):
    self.config, self.strategy, self.state, self.plan = config, strategy, state, plan
    self.splits, self.summaries, self.checkpointer = splits, summaries_, checkpointer
    self.training_log, self.sync_replicas = training_log, sync_replicas
    self.chief, self.out_dir = chief, out_dir
    self.evaluator = evaluation.make_evaluator(strategy, state, splits.evaluation, plan,
                                               config, plan.eval_steps)
    self.history = history
    self.best_accuracy = max((h[f"{splits.evaluation_name}_accuracy"] for h in history),
                             default=-1.0)
    # (step, results) of this process's last per-epoch evaluation.
    self.evaluated: tuple[int, dict] = (-1, {})

  def end_epoch(self, step: int) -> None:
    name, split_size = self.splits.evaluation_name, self.splits.evaluation.num_examples
    epoch = step / self.plan.steps_per_epoch
    planned = min(self.plan.eval_steps * self.plan.global_batch_size, split_size)
    logging.info("evaluating on %d %s images%s", planned, name,
                 "" if planned == split_size else f" of {split_size} (--eval_steps)")
    self.sync_replicas()
    results = self.evaluator.evaluate()
    confusion, examples = self.evaluator.confusion, self.evaluator.examples
    self.evaluated = (step, results)
    train_means = self.training_log.take_epoch_means()
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
    if self.chief:
      run_dir.write_history(self.out_dir, self.history)
    self.checkpointer.save(step)
    if results["accuracy"] > self.best_accuracy:
      self.best_accuracy = results["accuracy"]
      self.checkpointer.save_best(step)
    self.training_log.restart_interval(step)

  def final_test(self, step: int) -> dict:
    """The test split's metrics at the end, always over all of it: the last epoch's
    evaluation when it covered the whole test split at this step; else evaluated now
    (after a validation protocol or under an --eval_steps cap, or for a rerun of a
    finished run). With examples, per_class_accuracy and confusion_matrix."""
    evaluator = self.evaluator
    if self.splits.evaluation_name == run_files.TEST_EVENTS:
      if self.evaluated[0] == step and evaluator.examples == self.splits.test.num_examples:
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
    self.summaries.final_test(step, final, confusion)
    final["examples"] = evaluator.examples
    final["per_class_accuracy"] = metrics.per_class_accuracy(confusion,
                                                             self.splits.class_names)
    final["confusion_matrix"] = confusion.tolist()
    self.summaries.flush()
    return final


class StopCheck:
  """The stop protocol: after a StopRequest (SIGTERM, Ctrl-C), save at the next boundary
  and raise Stopped; under multi_worker, a signal to any worker stops every worker at one
  agreed step (stop.ClusterStop)."""

  def __init__(self, strategy: tf.distribute.Strategy, stop_request: StopRequest | None,
               checkpointer: Checkpointer, chief: bool, model_dir: str):
    self.stop_request, self.checkpointer = stop_request, checkpointer
    self.chief, self.model_dir = chief, model_dir
    self.step = checkpointer.saved_step
    self.cluster_stop = (
        stop.ClusterStop(strategy, stop_request, self._save_before_stopping, self._stopped)
        if stop_request is not None and _is_multi_worker(strategy) else None)

  def listen(self, listening: bool) -> None:
    """While listening, a signal asks for a stop at the next boundary; otherwise the
    handler raises at once (what is left is writing metrics.json)."""
    if self.stop_request is not None:
      self.stop_request.listening = listening

  def check(self, step: int) -> None:
    # Called only where the step and the model agree (between calls into TensorFlow, after
    # their bookkeeping), so the checkpoint resumes exactly there.
    self.step = step
    if self.cluster_stop is not None:
      self.cluster_stop.check()  # Every worker, at every boundary: they agree on a step.
      return
    if self.stop_request is None or self.stop_request.signum is None:
      return
    self._save_before_stopping()
    self._stopped()

  def _save_before_stopping(self) -> None:
    if self.step != self.checkpointer.saved_step:
      logging.info("saving a checkpoint at step %d before stopping", self.step)
      self.checkpointer.save(self.step)

  def _stopped(self) -> None:
    # A worker that was not signalled itself stops as for SIGTERM: the cluster's.
    signum = self.stop_request.signum or signal.SIGTERM
    saved_step = self.checkpointer.saved_step
    saved = os.path.join(self.model_dir, run_files.CHECKPOINT_SUBDIR,
                         f"ckpt-{saved_step}") if saved_step else None
    raise Stopped(signum, self.step,
                  self.checkpointer.checkpoints.latest if self.chief else saved)


def _is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
  resolver = getattr(strategy, "cluster_resolver", None)
  return bool(resolver is not None and resolver.cluster_spec().jobs)


def _duration(seconds: float) -> str:
  if seconds != seconds:
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
