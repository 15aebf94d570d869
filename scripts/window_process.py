"""A subprocess that trains timed windows on request, for the interleaved benchmarks
(benchmark.py --compare's PyTorch, compare_settings.py's settings): it answers one JSON
line on stdout when ready and, for every line STEPS on stdin, one {"seconds": ...} line."""

import json
import subprocess
import tempfile


class ProcessExited(RuntimeError):
  """The process ended before answering; the message ends with its stderr."""


class WindowProcess:
  """One such process; `hello` is its ready line."""

  def __init__(self, name: str, command: list[str], environment: dict | None = None):
    self.name = name
    # A file, not a pipe: a child that writes much to stderr cannot block on a full pipe
    # while we wait on its stdout.
    self.stderr = tempfile.TemporaryFile(mode="w+")
    self.process = subprocess.Popen(command, env=environment, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=self.stderr, text=True)
    self.hello = self.answer()

  def answer(self) -> dict:
    """The next JSON line on stdout (other lines skipped)."""
    for line in self.process.stdout:
      if line.startswith("{"):
        return json.loads(line)
    self.stderr.seek(0)
    raise ProcessExited(f"{self.name}: the process exited ({self.process.wait()}):\n"
                        f"{self.stderr.read()[-2000:]}")

  def window(self, steps: int) -> float:
    """Seconds the process took to train `steps` steps."""
    self.process.stdin.write(f"{steps}\n")
    self.process.stdin.flush()
    return self.answer()["seconds"]

  def close(self) -> None:
    self.process.stdin.close()
    self.process.wait(timeout=60)
    self.stderr.close()
