# One place that knows how to build the environment; README commands call these targets.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fngd-installed

.PHONY: venv test lint demo bench report gpu-check clean

venv: $(STAMP)

# torch/torchvision first (the pair that works together here), then fairseq-fixed, which
# compiles against that torch and therefore needs --no-build-isolation, then this project,
# editable: the tests, the CLIs and the plugin autoload (fngd-plugin.pth, which setup.py ships in
# editable installs too) all run the working tree, so an edit needs no reinstall. Every install
# is held to constraints.txt, the exact versions this machine is tested with.
CONSTRAINTS := constraints.txt
PIPC := $(PIP) install -q -c $(CONSTRAINTS)

$(STAMP): pyproject.toml setup.py fngd-plugin.pth $(CONSTRAINTS) Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIPC) torch torchvision
	$(PIPC) cython wheel numpy
	$(PIPC) --no-build-isolation fairseq-fixed
	$(PIPC) -e '.[timm,fairseq,sweep,analysis,lightning,hf,dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) examples/digits_demo.py

# README command 2: the default sweep (the converged image tuning's configurations, real offline data, seed 0, local
# executor), then the comparison report: results/report.md, results/tables/, results/plots/.
report: $(STAMP)
	$(PY) -m fngd_slurm default
	$(PY) -m fngd_analysis results/default --out results --title "FNGD vs KFAC, SGD, AdamW (default sweep)"

# the benchmarks, and first the check that FNGD's collect step equals ASDL's SMW natural gradient
# (float64, Linear-only models, the same identity computed independently: tests/test_asdl.py)
bench: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/test_asdl.py
	$(PY) benchmarks/step_cost.py --out results/benchmark.md
	$(PY) benchmarks/collect_profile.py --out results/collect_profile.md
	$(PY) benchmarks/gram_routes.py --out results/gram_routes.md
	$(PY) benchmarks/fallback_cost.py --out results/fallback_cost.md
	$(PY) benchmarks/sketch_cost.py --out results/sketch_cost.md
	$(PY) benchmarks/peers.py --quick --out results/peers.md

# What only a GPU can show (benchmarks/gpu_check.py, under 10 minutes): the exactness and loop-shape
# tests on CUDA in float64 and under bf16 autocast, the Gram routes and the collect profile at GPU
# sizes; writes benchmarks/reports/gpu-<device>.md. It installs nothing and runs this working tree
# with the interpreter given, e.g. a GPU machine's own: make gpu-check PY=python3
gpu-check:
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV)
