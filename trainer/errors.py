"""The trainer's user-facing errors: trainer/main.py turns any UserError into `error: ...`
on stderr and exit code 2; everything else is a bug or a training failure. And
root_cause, the line of a TensorFlow error that such messages quote."""


class UserError(Exception):
  """Something the user can fix (a setting, the data, the run directory, the cluster);
  the message says what is wrong and what to do."""


class ConfigError(UserError, ValueError):
  """A setting is invalid; the message names it and says what is allowed."""


class DataError(UserError):
  """The data cannot be loaded or does not fit the run; the message names the path."""


class RunDirError(UserError):
  """The run directory cannot be used as asked (not writable, no space, incompatible or
  unreadable checkpoints, in use by another trainer)."""


class DistributionError(UserError):
  """The strategy or cluster cannot be set up (bad TF_CONFIG, unreachable peers, ...)."""


class CheckpointError(RunDirError):
  """No usable checkpoint where one is needed; the message says what to do."""


class ExportError(UserError):
  """The export cannot be written where asked, or does not reproduce its checkpoint."""


class TrainingError(Exception):
  """Training cannot go on (e.g. the loss diverged); the last good checkpoint is kept.
  Not a UserError: trainer/main.py exits with code 1."""


def root_cause(message: str) -> str:
  """The line of a TensorFlow error message that says what went wrong, not where."""
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  boilerplate = ("Graph execution error", "Detected at node", "File ", "[[", "Traceback")
  causes = [line for line in lines if not line.startswith(boilerplate)]
  if not causes:
    return lines[0] if lines else "no details"
  # "...tasks are unhealthy (stopped sending heartbeats):" is followed by their names.
  cause = " ".join(causes[:2]) if causes[0].endswith(":") else causes[0]
  return cause[:300]
