# One place that knows how to build the environment; README commands call these targets.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fngd-installed

.PHONY: venv test lint demo bench report clean

venv: $(STAMP)

# torch/torchvision first (the pair that works together here), then fairseq-fixed, which
# compiles against that torch and therefore needs --no-build-isolation, then this project.
# A regular (not editable) install: the .pth that loads the plugins into timm and fairseq only
# ships that way. Sources are listed so that an edit reinstalls (pure Python, seconds).
SOURCES := $(wildcard fngd_plugin/*.py timm_ext/*.py fairseq_ext/*.py slurm/*.py slurm/*.sh slurm/presets/*.toml analysis/*.py) fngd_plugin_autoload.py fngd-plugin.pth setup.py

$(STAMP): pyproject.toml Makefile $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q cython wheel numpy
	$(PIP) install -q --no-build-isolation fairseq-fixed==0.12.3.1
	$(PIP) install -q '.[timm,fairseq,sweep,analysis,lightning,dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) examples/digits_demo.py

# README command 1: the default sweep (real offline data, FNGD/KFAC/SGD/AdamW, 2 seeds, local
# executor), then the comparison report: results/report.md, results/tables/, results/plots/.
report: $(STAMP)
	$(PY) -m fngd_slurm default
	$(PY) -m fngd_analysis results/default --out results --title "FNGD vs KFAC, SGD, AdamW (default sweep)"

bench: $(STAMP)
	$(PY) benchmarks/step_cost.py --out results/benchmark.md
	$(PY) benchmarks/fallback_cost.py --out results/fallback_cost.md

clean:
	rm -rf $(VENV)
