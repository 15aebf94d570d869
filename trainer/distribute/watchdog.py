"""The watchdog process that enforces --peer_timeout_seconds while this process joins a
cluster or reaches a TPU (which block in C++, out of Python's reach)."""

import os
import subprocess
import sys

# The watchdog process of _Deadline: it waits for its stdin to close (the parent finished in
# time, or died) and otherwise reports which peers do not listen and kills the parent.
_WATCHDOG = r"""
import os, select, signal, socket, sys, threading
parent, seconds, message, listening = int(sys.argv[1]), float(sys.argv[2]), *sys.argv[3:5]
peers = sys.argv[5:]
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; its exit ends us.
if select.select([sys.stdin], [], [], seconds)[0]:
  sys.exit(0)
silent = []

def probe(address):
  host, _, port = address.rpartition(":")
  try:
    socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
  except OSError:
    silent.append(address)

# All at once, so that many unreachable hosts still take 2 s, not 2 s each.
threads = [threading.Thread(target=probe, args=(a,), daemon=True) for a in peers]
for thread in threads:
  thread.start()
for thread in threads:
  thread.join(3)
silent = sorted(silent)
detail = (f"; nothing listens at {', '.join(silent)}" if silent else
          f"; {listening}" if peers else "")
sys.stderr.write(f"error: {message}{detail}\n")
sys.stderr.flush()
os.kill(parent, signal.SIGKILL)
"""


class _Deadline:
  """Kills this process with a clear message on stderr if the block does not end in time.

  Joining a cluster blocks inside TensorFlow's C++ runtime while holding the GIL: no Python
  thread or signal handler runs until it returns, the chief waits without limit for the
  other tasks to register, and SIGTERM is taken by TensorFlow's preemption notifier. So the
  watchdog is a separate small process that sends SIGKILL. Nothing has been written by then.
  """

  def __init__(self, seconds: float, message: str, peers: list[str], listening: str):
    """`peers`: host:port addresses to probe once the time is up; `listening`: what to
    say when all of them accept connections."""
    self._args = [str(os.getpid()), str(seconds), message, listening, *peers]
    self._process = None

  def __enter__(self):
    self._process = subprocess.Popen([sys.executable, "-c", _WATCHDOG, *self._args],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    return self

  def __exit__(self, *exc_info):
    self._process.stdin.close()  # Tells the watchdog to exit.
    self._process.wait()
