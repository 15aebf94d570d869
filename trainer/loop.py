"""The training loop, as a driver and its actions (in the manner of orbit's controller):
`Cadence` says where each call into TensorFlow ends (log steps, checkpoint steps, epoch
ends, the profiler window, steps per call); `Loop.run` trains from boundary to boundary
and calls there the actions due (actions.py): the stop check, the training log, the
epoch evaluation, the checkpoint; then the final test and the report (report.py)."""

import dataclasses
import time

from absl import logging
import tensorflow as tf

from input_pipeline import pipeline
from trainer import actions, data, distribute, report, run_dir, summaries
from trainer.config import Config
from trainer.state import per_replica_variables
from trainer.stop import StopRequest
from trainer.training import Training


@dataclasses.dataclass(frozen=True)
class Cadence:
  """Where calls into TensorFlow end: every log and checkpoint step, every epoch end
  (every steps_per_epoch steps, and the last step: he2016 schedules need not end on an
  epoch boundary), the profiler window's ends, and at most steps_per_execution apart."""
  steps_per_epoch: int
  total_steps: int
  steps_per_execution: int
  log_every_steps: int
  checkpoint_every_steps: int

  def epoch_end(self, step: int) -> int:
    """The end of the epoch that step + 1 belongs to."""
    return min((step // self.steps_per_epoch + 1) * self.steps_per_epoch, self.total_steps)

  def next_boundary(self, step: int, extra: list[int] = ()) -> int:
    """Where the call from `step` ends (`extra`: other boundaries after step)."""
    return min(self.epoch_end(step), step + self.steps_per_execution,
               _next_multiple(step, self.log_every_steps),
               _next_multiple(step, self.checkpoint_every_steps), *extra)

  def logs_at(self, step: int) -> bool:
    return step % self.log_every_steps == 0 or self.ends_epoch(step)

  def ends_epoch(self, step: int) -> bool:
    return step % self.steps_per_epoch == 0 or step == self.total_steps

  def checkpoints_at(self, step: int) -> bool:
    return step % self.checkpoint_every_steps == 0


def _next_multiple(step: int, every: int) -> int:
  return (step // every + 1) * every


@dataclasses.dataclass(frozen=True)
class RunPlace:
  """Where and when this process's part of the run happens."""
  out_dir: str       # the model dir on the chief, a scratch dir on other workers
  chief: bool
  start_step: int    # the restored step (0 for a new run)
  wall_start: float  # time.time() when this process started the run
  data_seed: int     # of the data order from start_step on (see train._data_seed)
  history: list      # the earlier run's per-epoch records (run_dir.EarlierRun)


class Loop:
  """Trains `training` from the restored step to the plan's last step, calling the
  actions at the boundaries of its calls; always where the step counter and the weights
  agree."""

  def __init__(self, config: Config, strategy: tf.distribute.Strategy, training: Training,
               splits: data.Splits, checkpoints: run_dir.Checkpoints, place: RunPlace,
               stop_request: StopRequest | None):
    self.training, self.splits = training, splits
    self.place, self.step = place, place.start_step
    plan, state = training.plan, training.state
    self.cadence = Cadence(plan.steps_per_epoch, plan.total_steps,
                           training.hardware.steps_per_execution, config.log_every_steps,
                           config.checkpoint_every_steps)
    self.iterator = iter(strategy.distribute_datasets_from_function(self._train_dataset))
    # Keras 3 batch norm updates each replica's moving statistics on its own batch only;
    # averaging the copies (and their moving averages) before every evaluation and save
    # keeps the replicas (and the workers' checkpoints) equal.
    sync_replicas = distribute.make_replica_sync(strategy, per_replica_variables(state))
    self.summaries = summaries.Summaries(place.out_dir, splits.evaluation_name, place.chief,
                                         splits.class_names)
    self.clock = actions.RunClock(state, place.wall_start)
    self.guard = actions.DivergenceGuard(state, training.steps, checkpoints, self.step)
    self.checkpointer = actions.Checkpointer(state, checkpoints, self.guard, sync_replicas,
                                             self.clock, self.step)
    self.log = actions.TrainingLog(config, plan, state, training.steps, self.summaries,
                                   self.guard, self.step)
    self.profiler = actions.Profiler(config.profile_steps, place.chief, place.out_dir)
    # Epochs after the restored checkpoint were lost with the crash: forget them.
    self.epochs = actions.EpochEvaluation(
        config, strategy, state, plan, splits, self.summaries, self.checkpointer, self.log,
        sync_replicas, [h for h in place.history if h["step"] <= self.step], place.chief,
        place.out_dir)
    self.stop = actions.StopCheck(strategy, stop_request, self.checkpointer, place.chief,
                                  config.model_dir)

  def _train_dataset(self, input_context: tf.distribute.InputContext) -> tf.data.Dataset:
    return pipeline.train_pipeline(
        self.splits.train.as_dataset(),
        per_replica_batch_size=self.training.plan.per_replica_batch_size,
        seed=self.place.data_seed, start_step=self.place.start_step,
        input_context=input_context, with_ids=self.training.steps.record_steps > 0)

  def run(self) -> None:
    """Trains from the restored step to the plan's last step."""
    plan = self.training.plan
    logging.info("training %s for %.2f epochs (%d steps) from step %d",
                 self.training.state.model.name, plan.total_epochs, plan.total_steps,
                 self.place.start_step)
    self.stop.listen(True)
    while self.step < plan.total_steps:
      self.stop.check(self.step)
      self._train_until(self.cadence.next_boundary(self.step,
                                                   self.profiler.boundaries(self.step)))
      if self.cadence.logs_at(self.step):
        self.log.log(self.step)
      if self.cadence.ends_epoch(self.step):
        self.epochs.end_epoch(self.step)
      elif self.cadence.checkpoints_at(self.step):
        self.checkpointer.save(self.step)
    self.stop.check(self.step)
    # From here on a signal raises at once: what is left is writing metrics.json.
    self.stop.listen(False)
    self.guard.check(self.step)

  def _train_until(self, until: int) -> None:
    """One call into TensorFlow: steps self.step + 1 .. until."""
    steps = self.training.steps
    self.profiler.before_call(self.step)
    call_start = time.time()
    steps.run(self.iterator, tf.constant(self.step, tf.int64),
              tf.constant(until - self.step, tf.int64))
    self.log.timed(self.step, until, call_start)
    if steps.record_steps:
      batches = steps.recorded_ids(self.step, until)
      if self.place.chief:
        run_dir.append_batches(self.place.out_dir, batches)
    self.step = until
    self.profiler.after_call(self.step)

  def final_metrics(self) -> dict:
    """metrics.json: the final test metrics over the whole test split, and the report."""
    final = self.epochs.final_test(self.step)
    return report.final_metrics(self.training, self.epochs, self.clock, self.step,
                                self.place.start_step, final)
