"""absl flag parsing in the project's error format, for trainer/main.py and scripts/: a bad
flag prints `error: ...` and a hint and exits 2 (absl: "FATAL Flags parsing error", exit 1);
--help and --helpfull print their text and exit 0 (absl: exit 1)."""

import contextlib
import sys
import textwrap
from collections.abc import Callable

from absl import flags

FLAGS = flags.FLAGS

_HELP = ("help", "h", "?", "helpshort")
_HELPFULL = "helpfull"


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
    message = str(e).removeprefix("ERROR:: ")
    if "\n" in message:
      message = "\n" + textwrap.indent(message, "  ")
    fail(f"{message}\nsee --help for the flags")


def script_help() -> str:
  """A script's --help: its docstring, then the flags it defines (absl's short help)."""
  doc = (sys.modules["__main__"].__doc__ or "").strip()
  own = FLAGS.main_module_help()
  return f"{doc}\n\nflags:\n{own}" if own else doc


def script_parser(argv: list[str]) -> list[str]:
  """For a script's `app.run(main, flags_parser=cli.script_parser)`."""
  return parse(argv, script_help, (sys.modules["__main__"].__doc__ or "").strip())
