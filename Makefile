# Two commands a fresh clone needs: `make train` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Quickstart training run: ResNet-20 on CIFAR-10. With DATA_DIR (a folder of class
# sub-folders) it reads images from there, otherwise tensorflow-datasets. On the team's
# machines the copy of CIFAR-10 beside the checkout is picked up by default.
DATA_DIR ?= $(wildcard ../shared/datasets/cifar10-jpeg)
DATA ?= $(if $(DATA_DIR),folder,tfds)
DEPTH ?= 20
ARGS ?=

.PHONY: setup train test test-fast coverage

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

train: setup
	$(PY) -m trainer.main --depth=$(DEPTH) --data_source=$(DATA) $(if $(DATA_DIR),--data_dir=$(DATA_DIR)) --model_dir=runs/resnet$(DEPTH) $(ARGS)

# Two test processes, each test file whole in one (its module fixtures run once, and the
# real-Slurm tests one after another). On the 2-core AMD EPYC VM, 2026-12-08, a fresh
# clone's `bash .ci/run` at ba8e5a5: pytest 1074 s (601 tests; 1509 s at 08f8b64, before
# the tests' synthetic runs used small splits); on the 2-core Xeon VM, 2026-12-05: 920 s
# (503 tests).
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The in-process tests of the pieces: every test not marked `process` (none starts the
# trainer, a script or another program; tests/conftest.py fails one that does). For a quick
# check while editing; `make test` (what CI runs) stays the whole suite. On the 2-core AMD
# EPYC VM (AVX-512), 2026-12-08, `time make test-fast` with .venv set up: 67 s wall
# (389 of 601 tests: 388 passed, 1 skipped as root).
test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not process" tests

# What the whole suite covers of trainer/ and input_pipeline/, the processes it starts
# included (pyproject.toml's [tool.coverage.*]). On the 2-core AMD EPYC VM, 2026-12-08:
# 1373 s of pytest (`make test`: 1094 s), 93.6% of 3111 statements.
coverage: setup
	$(PY) -m pip install --quiet 'coverage>=7.10'
	rm -f .coverage .coverage.*
	COVERAGE_FILE=$(CURDIR)/.coverage $(PY) -m coverage run -m pytest -q -n 2 --dist loadfile tests
	$(PY) -m coverage combine --quiet && $(PY) -m coverage report
