# make test: install into .venv (torch first: it decides which torch build pip picks) and run lint + the suite.
# make demo: the embedded default end to end on CPU: phantom builds with and without boundary prompts, align and sft
#   of a tiny model on each, evaluation of both and one comparison table (med3dqwen/scripts/demo.py; minutes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NLTK_DATA ?= $(abspath ../shared/nltk_data)
export NLTK_DATA
export HF_HUB_OFFLINE ?= 1
DEMO_DIR ?= build/demo

.PHONY: install test lint demo bench clean

install: $(STAMP)

$(STAMP): setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -n 2 -q

demo: $(STAMP)
	$(PY) -m med3dqwen.scripts.demo --output_dir $(DEMO_DIR)

bench: $(STAMP)
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(PY) bench/bench_contour.py
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(PY) bench/bench_io.py

clean:
	rm -rf build .pytest_cache
