"""The stop protocol: Ctrl-C and SIGTERM become a StopRequest that the training loop answers
at its next step boundary by saving a checkpoint and raising Stopped; where no loop listens,
the signal raises KeyboardInterrupt (Terminated for SIGTERM) at once."""

import os
import signal
import sys
import threading

# How each signal ends the run: the words for the error line and the exit status (128 +
# the signal number, as a shell reports a process the signal killed).
STOPS = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated (SIGTERM)", 143)}
_NAMES = {signal.SIGINT: "interrupt", signal.SIGTERM: "SIGTERM"}


class StopRequest:
  """A Ctrl-C or SIGTERM that the training loop answers by saving a checkpoint, then stopping.

  A signal handler calls `request`. The loop listens only between its first and last step:
  before that (loading, building) there is nothing new to save, so the handler should raise
  at once instead, as it should for runs that cannot save alone (multi-worker).
  """

  def __init__(self):
    self.listening = False
    self.signum: int | None = None
    # Multi-worker: TensorFlow's preemption handler, which the signal is handed to (see
    # ClusterStop); the loop then leaves the stop to it.
    self.forward = None

  def request(self, signum: int) -> bool:
    """Asks the loop to save and stop; False when no loop listens (raise instead).

    Args:
      signum: the signal that asked (the first one is kept; repeats are absorbed, since a
        terminal's Ctrl-C and a launcher's forwarded SIGINT often arrive together).
    Returns:
      whether the loop will stop at its next step boundary.
    """
    if not self.listening:
      return False
    if self.signum is None:
      self.signum = signum
    return True


class Stopped(Exception):
  """The loop stopped on a StopRequest, after saving a checkpoint at `step`."""

  def __init__(self, signum: int, step: int, checkpoint: str | None):
    super().__init__(f"stopped by signal {signum} at step {step}")
    self.signum, self.step, self.checkpoint = signum, step, checkpoint


class Terminated(KeyboardInterrupt):
  """SIGTERM (what Slurm, Kubernetes and `kill` send) stops the run like Ctrl-C does."""


def signal_of(e: KeyboardInterrupt) -> int:
  """The signal that raised `e` (see SignalHandler)."""
  return signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT


class SignalHandler:
  """Owns SIGINT and SIGTERM for the process: hands them to the StopRequest of a listening
  loop, or raises at once; and says "stopping" the moment one arrives."""

  def __init__(self):
    self.stop_request: StopRequest | None = None
    self.announced = threading.Event()

  def install(self) -> None:
    """Takes both signals. A shell without job control starts background commands with
    SIGINT ignored; the launch and study scripts stop trainers with SIGINT, so it must
    always mean "stop"."""
    signal.signal(signal.SIGINT, self._on_signal)
    self.take_sigterm()
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    # Python runs its handlers only once TensorFlow hands control back (a CPU step can
    # take seconds), but the C-level handler writes to the wake-up fd at once.
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=self._announce, args=(read_fd,), name="interrupt-notice",
                     daemon=True).start()

  def take_sigterm(self) -> None:
    """(Re)installs the SIGTERM handler; MultiWorkerMirroredStrategy's coordination
    service installs TensorFlow's own, which swallows the signal."""
    signal.signal(signal.SIGTERM, self._on_signal)

  def listen(self) -> StopRequest:
    """A StopRequest the training loop will answer; signals go to it from now on."""
    self.stop_request = StopRequest()
    return self.stop_request

  def _on_signal(self, signum, frame) -> None:
    request = self.stop_request
    if request is not None and request.request(signum):
      if request.forward is not None:
        request.forward(signum, frame)
      return
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

  def _announce(self, read_fd: int) -> None:
    while True:
      for signum in os.read(read_fd, 64):
        if signum in _NAMES:
          saving = self.stop_request is not None and self.stop_request.listening
          print(f"{_NAMES[signum]} received: stopping when the current TensorFlow call "
                f"returns{', after saving a checkpoint' if saving else ''}",
                file=sys.stderr, flush=True)
          self.announced.set()


class ClusterStop:
  """Multi-worker runs stop together: a signal to any worker (or to all) makes every
  worker save one checkpoint at the same step, then raise Stopped.

  TensorFlow's PreemptionCheckpointHandler agrees on that step through the coordination
  service; this class gives it our save (`save_fn`, collective) and our way out
  (`exit_fn` raises Stopped), and a throwaway checkpoint of its own, so that its call
  counter starts equal on every worker and our checkpoints keep their format. Call
  `check()` at every boundary between training calls, on every worker.
  """

  def __init__(self, strategy, stop_request: StopRequest, save_fn, stopped_fn):
    import tempfile  # Only multi-worker runs get here.
    import tensorflow as tf
    self._scratch = tempfile.TemporaryDirectory(prefix="resnet-cifar-preemption-")
    counter = tf.train.Checkpoint()
    ours = signal.getsignal(signal.SIGTERM)
    self.handler = tf.distribute.experimental.PreemptionCheckpointHandler(
        strategy.cluster_resolver,
        tf.train.CheckpointManager(counter, self._scratch.name, max_to_keep=1),
        termination_config=tf.distribute.experimental.TerminationConfig(
            exit_fn=stopped_fn, save_fn=save_fn, grace_period=0))
    # It installed its own SIGTERM handler: signals stay ours (so that Ctrl-C counts
    # too, and the exit code tells them apart) and are handed on to it.
    stop_request.forward = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, ours)

  def check(self) -> None:
    """Saves and raises Stopped once the cluster's agreed step is reached."""
    import tensorflow as tf
    logger = tf.get_logger()
    level = logger.level
    # Its save reads its own deprecated call counter, which warns: not the user's news.
    logger.setLevel("ERROR")
    try:
      self.handler.save_checkpoint_if_preempted()
    finally:
      logger.setLevel(level)
