"""What a person reads: plain progress lines on the console (absl's full prefix goes to
train.log in the run dir instead), and the run's settings as a short grouped block."""

import logging as std_logging
import os
import time

from absl import logging

from trainer import config as config_lib
from trainer import run_files
from trainer.config import Config, flag_text

# The settings block: each group a line of the settings people look at first.
_FULL_FORMAT = logging.PythonFormatter()


class _PlainFormatter(std_logging.Formatter):
  """The message alone for INFO; "warning: " or "error: " before the others."""

  def format(self, record: std_logging.LogRecord) -> str:
    message = record.getMessage()
    if record.levelno >= std_logging.WARNING:
      return f"{record.levelname.lower()}: {message}"
    return message


class RunLogFile(std_logging.Handler):
  """Appends every log record, in absl's full format, to MODEL_DIR/train.log once this
  run has been accepted there, i.e. has written its config.json (earlier records wait in
  memory, so a refused run changes nothing in the run dir)."""

  def __init__(self, model_dir: str):
    super().__init__()
    self.path = os.path.join(model_dir, run_files.LOG_FILE)
    self.config_path = os.path.join(model_dir, run_files.CONFIG_FILE)
    self.created = time.time()
    self.pending: list[str] = []
    self.accepted = False

  def _accepted(self) -> bool:
    if not self.accepted:  # Once accepted, no more stat per record.
      try:
        self.accepted = os.path.getmtime(self.config_path) >= self.created - 1.0
      except OSError:
        pass
    return self.accepted

  def emit(self, record: std_logging.LogRecord) -> None:
    self.pending.append(_FULL_FORMAT.format(record))
    if not self._accepted():
      return
    try:
      with open(self.path, "a") as f:
        f.write("".join(f"{line}\n" for line in self.pending))
      self.pending.clear()
    except OSError:
      pass  # A read-only or full run dir: the console still has every line.


def configure(model_dir: str | None) -> RunLogFile | None:
  """Plain lines on the console; the full format in model_dir/train.log when given.

  Returns:
    the train.log handler (detach it with `detach`, e.g. on a worker that is not the
    chief: only the chief writes into --model_dir).
  """
  logging.get_absl_handler().setFormatter(_PlainFormatter())
  if not model_dir:
    return None
  handler = RunLogFile(model_dir)
  std_logging.getLogger().addHandler(handler)
  return handler


def detach(handler: RunLogFile) -> None:
  std_logging.getLogger().removeHandler(handler)


def settings_block(config: Config) -> str:
  """The settings, one line per group, only what is set (None and False left out)."""
  settings = vars(config)
  lines = []
  for group, names in config_lib.groups().items():
    shown = [f"{name}={flag_text(settings[name])}" for name in names
             if settings[name] is not None and settings[name] is not False]
    lines.append(f"  {group + ':':<14}{' '.join(shown)}")
  return "settings:\n" + "\n".join(lines)

