"""The console side shared by trainer/main.py and scripts/: absl flag parsing in the
project's error format (a bad flag: `error: ...`, exit 2; --help: exit 0, where absl exits 1),
and TensorFlow loaded without its C++ start-up messages."""

import contextlib
import os
import re
import sys
import textwrap
from collections.abc import Callable

from absl import flags, logging

FLAGS = flags.FLAGS

_HELP = ("help", "h", "?", "helpshort")
_HELPFULL = "helpfull"
# absl passes Python's conversion errors through ("invalid literal for int() with base 10:
# '0.1'"): each, in words a user of the command line reads.
_PLAIN_REASONS = (
    (r"invalid literal for int\(\) with base 10: .*", "not a whole number"),
    (r"could not convert string to float: .*", "not a number"),
    (r"\('Non-boolean argument to boolean flag', .*\)",
     "not true or false (--{name} or --no{name} alone also work)"),
)


def fail(message: str, code: int = 2) -> None:
  """`error: <message>` on stderr and exit `code`: every user error of the trainer and the
  scripts (not app.UsageError, which prints the whole docstring first and exits 1)."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def requested_help(argv: list[str]) -> str | None:
  """"help" or "helpfull" if an argument asks for it, in any spelling absl takes (-help,
  --help, --help=true); else None."""
  for arg in argv[1:]:
    name, _, value = arg.lstrip("-").partition("=")
    if arg.startswith("-") and value.lower() in ("", "true", "t", "1"):
      if name in _HELP:
        return "help"
      if name == _HELPFULL:
        return _HELPFULL
  return None


def parse(argv: list[str], help_text: Callable[[], str], usage: str) -> list[str]:
  """absl's parsing of argv into FLAGS, in the project's format; returns the positional
  arguments (argv[0] first), as absl's parser does.

  Args:
    help_text: what --help prints.
    usage: what --helpfull prints before every flag of every module (absl's own too).
  """
  wanted = requested_help(argv)
  if wanted is not None:
    text = (help_text() if wanted == "help"
            else f"{usage}\n\nevery flag, by module:\n{FLAGS.get_help()}")
    with contextlib.suppress(BrokenPipeError):  # e.g. `--help | head`
      print(text, flush=True)
    sys.exit(0)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(f"{flag_error(e)}\nsee --help for the flags")


def flag_error(error: flags.Error, flag_values: flags.FlagValues = FLAGS) -> str:
  """absl's message for a bad flag, its Python-speak in words, and the flag's help after a
  value that does not parse (e.g. --validation_split=0.1: a count of images, not a
  fraction)."""
  message = str(error).removeprefix("ERROR:: ")
  bad_value = re.fullmatch(r"flag --(\w+)=(.*?): (.*)", message, re.DOTALL)
  if bad_value:
    name, value, reason = bad_value.groups()
    for pattern, plain in _PLAIN_REASONS:
      if re.fullmatch(pattern, reason, re.DOTALL):
        reason = plain.format(name=name)
    message = f"flag --{name}={value}: {reason}"
    if name in flag_values and flag_values[name].help:
      message += "\n" + textwrap.fill(f"--{name}: {flag_values[name].help}", 88,
                                      initial_indent="  ", subsequent_indent="    ")
  elif "\n" in message:
    message = "\n" + textwrap.indent(message, "  ")
  return message


def script_help() -> str:
  """A script's --help: its docstring, then the flags it defines (absl's short help)."""
  doc = (sys.modules["__main__"].__doc__ or "").strip()
  own = FLAGS.main_module_help()
  return f"{doc}\n\nflags:\n{own}" if own else doc


def script_parser(argv: list[str]) -> list[str]:
  """For a script's `app.run(main, flags_parser=cli.script_parser)`."""
  return parse(argv, script_help, (sys.modules["__main__"].__doc__ or "").strip())


def import_tensorflow(show_logs: bool = False) -> None:
  """Imports TensorFlow, hiding its C++ start-up messages (a CUDA "error" on every CPU
  machine among them) unless asked for.

  Those messages are written before TensorFlow's logging is configured, so no setting
  silences them: stderr is pointed at /dev/null while the library loads. A failed import
  still raises, and its traceback prints once stderr is back.
  """
  if show_logs:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    import tensorflow as tf
    tf.config.list_physical_devices()
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    import tensorflow as tf
    tf.config.list_physical_devices()
  finally:
    os.dup2(saved, 2)
    os.close(devnull)
    os.close(saved)
  # TensorFlow's Python-side INFO chatter stays off the console too: through its own logger,
  # and through absl's from some modules (a checkpoint's "Sharding callback duration", a
  # remote TPU's whole session config).
  tf.get_logger().setLevel("WARNING")
  package = os.path.dirname(tf.__file__) + os.sep
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno > logging.converter.STANDARD_INFO
      or not record.pathname.startswith(package))
