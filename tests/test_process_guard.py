"""The `process` marker's guard (tests/conftest.py): a test not marked `process` that starts a
program fails, saying to mark it; a marked one may; a library that shells out on its own
does not count. The fixture case (a module fixture that ran the trainer for an earlier
test) is the same guard's pytest_runtest_call."""

import os
import re
import subprocess
import sys

import pytest

import conftest


def _swallow_expected_violation(request) -> None:
  """The guard records each violation on the test too (so that swallowing its error does
  not help); these tests provoke one on purpose."""
  request.node.stash[conftest._VIOLATIONS] = []


def test_an_unmarked_test_that_starts_a_program_fails_saying_to_mark_it(request):
  with pytest.raises(pytest.fail.Exception,
                     match=re.escape(conftest.PROCESS_MESSAGE) + r".*\btrue\b.*"
                     r"tests/test_process_guard\.py:\d+"):
    subprocess.run(["true"], check=True)
  _swallow_expected_violation(request)


def test_an_unmarked_test_that_forks_fails_too(request):
  with pytest.raises(pytest.fail.Exception, match=re.escape(conftest.PROCESS_MESSAGE)):
    # Only reached with a broken guard: the child must not go on running the session.
    if (pid := os.fork()) == 0:
      os._exit(0)
    os.waitpid(pid, 0)
  _swallow_expected_violation(request)


@pytest.mark.process
def test_a_marked_test_may_start_a_program():
  assert subprocess.run([sys.executable, "-c", "print(42)"], capture_output=True,
                        text=True, check=True).stdout == "42\n"


def test_a_library_that_starts_a_program_on_its_own_is_let_through():
  # A file under site-packages stands for matplotlib running fc-list for its font cache.
  library = compile("import subprocess\nresult = subprocess.run(['true'])\n",
                    "/somewhere/site-packages/some_library/fonts.py", "exec")
  namespace = {}
  exec(library, namespace)
  assert namespace["result"].returncode == 0
