"""The documentation cannot drift from the code: docs/flags.md lists exactly the trainer's
flags, in --help's groups, with their real defaults; links and page names resolve; and
the shell commands of README.md and docs/ run as written, or the test says why not."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO, run_main, write_image

DOCS = REPO / "docs"
FLAGS_PAGE = DOCS / "flags.md"
# Written by a parallel change (the Slurm launcher); links to it are checked once it exists.
PENDING_PAGES: set[str] = set()  # pages linked before they are written


def documented_pages() -> list[pathlib.Path]:
  return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


# docs/flags.md.

def help_groups() -> list[tuple[str, list[str]]]:
  """`python -m trainer.main --help` as [(group, [flag names])], in its order."""
  result = run_main("--help", timeout=60)
  assert result.returncode == 0, result.stderr
  groups = []
  for line in result.stdout.splitlines():
    if re.fullmatch(r"[a-z ]+:", line) and line != "usage:":
      groups.append((line[:-1], []))
    elif groups and (flag := re.match(r"  --(\w+)", line)):
      groups[-1][1].append(flag.group(1))
  return groups


def documented_flags() -> list[tuple[str, list[tuple[str, str]]]]:
  """docs/flags.md as [(group, [(flag name, default cell)])]: its `## group` sections and
  their table rows `| `--name` | default | meaning |`."""
  groups = []
  for line in FLAGS_PAGE.read_text().splitlines():
    if heading := re.fullmatch(r"## (.+)", line):
      groups.append((heading.group(1), []))
    elif row := re.fullmatch(r"\| `--(\w+)` \| (.*?) \| .* \|", line):
      assert groups, f"a flag row before the first group heading: {line}"
      groups[-1][1].append((row.group(1), row.group(2)))
  return [(group, rows) for group, rows in groups if rows]


@pytest.mark.process
def test_flags_page_lists_each_trainer_flag_once_in_the_help_groups():
  from absl import flags
  from trainer import main as main_lib

  documented = [(group, [name for name, _ in rows]) for group, rows in documented_flags()]
  assert documented == help_groups()
  names = [name for _, group in documented for name in group]
  assert len(names) == len(set(names)), "a flag documented twice"
  defined = {flag.name for flag in flags.FLAGS.get_flags_for_module(main_lib.__name__)}
  assert set(names) == defined


def test_each_documented_default_is_the_flags_real_default():
  """`V`: the flag's default, as written on the command line; recipe (`fast`: V): no
  default of its own, the fast recipe's V; none: no default (the meaning says what then)."""
  from absl import flags
  from trainer import main as main_lib  # noqa: F401  (defines the flags)
  from trainer import recipes

  fast = recipes.RECIPES["fast"]
  for _, rows in documented_flags():
    for name, cell in rows:
      flag = flags.FLAGS[name]
      if recipe := re.fullmatch(r"recipe \(`fast`: (?:`(.+)`|none)\)", cell):
        assert flag.default is None and name in fast, f"--{name}: {cell}"
        value = None if recipe.group(1) is None else flag.parser.parse(recipe.group(1))
        assert value == fast[name], f"--{name}: {cell}, but the fast recipe has {fast[name]}"
      elif cell == "none":
        assert flag.default is None and name not in fast, f"--{name}: {cell}"
      else:
        written = re.fullmatch(r"`(.+)`", cell)
        assert written, f"--{name}: the default cell {cell!r} is none of the three forms"
        assert flag.parser.parse(written.group(1)) == flag.default, f"--{name}: {cell}"


@pytest.mark.process
def test_help_and_flags_page_state_the_l2_convention_and_what_seed_seeds():
  result = run_main("--help", timeout=60)
  page = FLAGS_PAGE.read_text()
  for text in (" ".join(result.stdout.split()), " ".join(page.split())):
    assert "0.5 * weight_decay" in text
    assert "drawn for this run" in text  # --seed: the data order only with --deterministic


# Links and page names.

def _slug(heading: str) -> str:
  """GitHub's anchor of a Markdown heading."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
  return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", page.read_text(), re.M)}


@pytest.mark.parametrize("page", ["distribution.md", "invariants.md"])
def test_the_documented_replica_tolerances_are_the_ones_the_tests_hold(page):
  """docs/distribution.md promised "within 1e-5 of each tensor's scale after 6 steps"
  while the tests checked 1e-2 of the change; the pages now quote the tests' values."""
  from conftest import REPLICA_TOLERANCE
  text = " ".join((DOCS / page).read_text().split())
  stated = re.search(r"(\S+) in float32, (\S+) in `mixed_float16` and (\S+) in "
                     r"`mixed_bfloat16`", text)
  assert stated, f"{page} states no tolerance per precision"
  assert [float(value.strip(",")) for value in stated.groups()] == [
      REPLICA_TOLERANCE[p] for p in ("float32", "mixed_float16", "mixed_bfloat16")]
  assert "of each tensor's scale" not in text


def test_the_resuming_page_names_every_setting_a_resumed_run_must_keep():
  from trainer import config as config_lib
  page = (REPO / "docs" / "resuming.md").read_text()
  refused = page[page.index("Refused before anything is written"):]
  refused = refused[:refused.index("\n- ")]  # Its bullet point.
  named = set(re.findall(r"`--(\w+)`", refused))
  assert set(config_lib.RESUME_FIXED) <= named, set(config_lib.RESUME_FIXED) - named


def test_every_relative_link_in_readme_and_docs_resolves():
  pages = [*documented_pages(), REPO / "WORKSPACE.md", REPO / "RESULTS.md",
           REPO / "BENCHMARKS.md"]
  for page in pages:
    for target, anchor in re.findall(r"\]\(([^)\s#]*)(?:#([^)\s]+))?\)", page.read_text()):
      if re.match(r"[a-z]+:", target):
        continue  # https:, mailto:
      path = (page.parent / target).resolve() if target else page
      where = f"{page.relative_to(REPO)}: ({target}#{anchor})"
      if str(path.relative_to(REPO)) in PENDING_PAGES and not path.exists():
        continue
      assert path.exists(), where
      if anchor:
        assert anchor in _anchors(path), where


def test_code_and_docs_name_only_existing_pages_and_readme_sections():
  """A page of docs/ named anywhere in the code or the Markdown exists; a
  `README, "Section"` reference names a heading README.md has."""
  readme_headings = {m.group(1) for m in re.finditer(r"^#+ (.+)$",
                                                     (REPO / "README.md").read_text(), re.M)}
  files = [p for folder in ("trainer", "scripts", "tests", "input_pipeline", "docs")
           for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".md", ".sh")]
  files += list(REPO.glob("*.md"))
  for path in set(files) - {pathlib.Path(__file__)}:
    text = path.read_text()
    for page in set(re.findall(r"(?<![\w/.])docs/[\w-]+\.md\b", text)):
      assert (REPO / page).exists() or page in PENDING_PAGES, f"{path}: {page}"
    for section in re.findall(r"README(?:\.md)?, \\?\"([^\"\\]+)", text):
      assert section in readme_headings, f"{path}: README, \"{section}\""


# The shell commands of README.md and docs/.

def documented_commands() -> list[tuple[str, str]]:
  """(page, command) for every command in a ```sh block of README.md and docs/*.md:
  continuation lines joined, comment lines and trailing comments left out."""
  commands = []
  for page in documented_pages():
    for block in re.findall(r"^ *```sh\n(.*?)^ *```", page.read_text(), re.M | re.S):
      for command in re.sub(r"\\\n\s*", " ", block).splitlines():
        command = re.sub(r"\s+# .*$", "", command).strip()
        if command and not command.startswith("#"):
          commands.append((page.name, command))
  return commands


# Not run here, and why.
NOT_RUN = [
    (r"^make train", "trains ResNet-20 for 30 epochs on all of CIFAR-10: hours on a CPU"),
    (r"^make test", "the test suite, whole (about 15-25 minutes) or its in-process part "
     "(about 3): it runs this module too"),
    (r"cifar10-jpeg|--data_dir=DIR", "reads the 60,000-image CIFAR-10 copy (or a "
     "placeholder DIR) and trains on it for hours"),
    (r"^tensorboard ", "a web server that runs until it is stopped"),
    (r"--strategy=multi_worker|^srun |^export TF_CONFIG|^cd /path/to/",
     "one worker of a cluster of machines (TF_CONFIG or Slurm), or its job script"),
    (r"scripts/benchmark\.py", "times the machine for minutes (the last one needs an H100)"),
    (r"^sbatch |scripts/slurm/local_cluster\.sh|^export SLURM_CONF=",
     "needs a Slurm cluster (root to start the local one): tests/test_slurm_real.py runs "
     "them on scripts/slurm/local_cluster.sh's"),
    (r"scripts/plot_runs\.py .*runs/study", "needs a finished study in runs/study"),
    (r"scripts/model_summary\.py --all", "builds every network, ResNet-1202 and ResNet-152 "
     "among them: minutes"),
]
# Run as written, from a scratch dir where runs/smoke is a tiny run the README's own
# command trained and runs/r20 a link to it, with scripts/ linked from the repo, cat.png
# and more_images/ beside them; `python` and `.venv/bin/python` are this interpreter.
SMOKE_RUN = ("python -m trainer.main --depth=8 --data_source=synthetic "
             "--synthetic_examples=512,64 --global_batch_size=32 --epochs=2 --steps_per_epoch=10 "
             "--eval_steps=1 --model_dir=runs/smoke")
RUN = {
    SMOKE_RUN: "metrics.json",
    "python -m trainer.main --help": "--depth (default: 50)",
    "python -m trainer.main --flagfile=my_run.flags": "on all 64 test images",
    "python -m trainer.main --mode=eval --model_dir=runs/smoke": "on all 64 test images",
    "python -m trainer.main --mode=eval --model_dir=runs/r20": "on all 64 test images",
    "python -m trainer.main --mode=eval --model_dir=runs/r20 --checkpoint=best": "best/ckpt-",
    "python -m trainer.main --mode=export --model_dir=runs/r20": "exported",  # EXPORT
    "python scripts/predict.py runs/r20/export cat.png more_images/ --top_k=3": "cat.png: ",
    ".venv/bin/python scripts/model_summary.py --depth=56": '"params"',
    ".venv/bin/python scripts/model_summary.py --depth=56 --plain": '"plain": true',
}


def _not_run_reason(command: str) -> str | None:
  return next((why for pattern, why in NOT_RUN if re.search(pattern, command)), None)


def test_every_documented_command_is_run_here_or_says_why_not():
  for page, command in documented_commands():
    runs, reason = command in RUN, _not_run_reason(command)
    assert runs != bool(reason), (f"{page}: `{command}` must be in RUN or match one NOT_RUN "
                                  "pattern (not both)")
  assert set(RUN) <= {command for _, command in documented_commands()}, "RUN has stale entries"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> pathlib.Path:
  """The scratch dir the commands run in, with README's smoke run trained there."""
  import numpy as np
  root = tmp_path_factory.mktemp("docs_commands")
  (root / "scripts").symlink_to(REPO / "scripts")
  (root / "my_run.flags").write_text("--mode=eval\n--model_dir=runs/smoke\n")
  rng = np.random.default_rng(0)
  for name in ("cat.png", "more_images/dog.png", "more_images/deeper/ship.jpg"):
    write_image(root / name, rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
  result = _run(SMOKE_RUN, root)
  assert result.returncode == 0, result.stderr[-3000:]
  (root / "runs" / "r20").symlink_to("smoke")
  return root


def _run(command: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
  argv = shlex.split(command)
  if argv[0] in ("python", ".venv/bin/python"):
    argv[0] = sys.executable
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


EXPORT = "python -m trainer.main --mode=export --model_dir=runs/r20"
# What a command reads that another documented command writes.
NEEDS = {"python scripts/predict.py runs/r20/export cat.png more_images/ --top_k=3": EXPORT}


@pytest.mark.process
@pytest.mark.parametrize("command", [c for c in RUN if c != SMOKE_RUN])
def test_documented_command_runs_as_written(scratch, command):
  if command in NEEDS and not (scratch / "runs" / "r20" / "export").exists():
    assert _run(NEEDS[command], scratch).returncode == 0
  result = _run(command, scratch)
  assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
  assert RUN[command] in result.stdout, f"{command}\n{result.stdout[-3000:]}"


@pytest.mark.process
def test_readme_smoke_run_finishes_and_writes_its_metrics(scratch):
  metrics = json.loads((scratch / "runs" / "smoke" / RUN[SMOKE_RUN]).read_text())
  assert metrics["steps"] == 20 and metrics["epochs"] == 2
