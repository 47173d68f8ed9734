# make test: install into .venv (torch first: it decides which torch build pip picks) and run lint + the suite.
# make demo: build the synthetic-phantom dataset with boundary-prompt overlays (the embedded default).
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
	$(PY) datasets_scripts/build_phantom.py --output_dir $(DEMO_DIR) --num_volumes 20 --seed 0 --prompt red --write_png montage

bench: $(STAMP)
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(PY) bench/bench_contour.py
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(PY) bench/bench_io.py

clean:
	rm -rf build .pytest_cache
