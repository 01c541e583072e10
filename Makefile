# deqbench: `make demo` (set up + main job) and `make test` (set up + test suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deqbench-installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup data browser test test-fast demo bench gpu-check gpu-check-tiny zoo leaderboard leaderboard-check clean

setup: $(STAMP)

# torch/torchvision first (served from the machine's local wheel cache), then everything else
# in ONE resolver run (library-facts.md). Then verify that torchattacks' bundled copy of an old
# robustbench did not overwrite the real one, and repair it if it did.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m model_zoo.compat --check || { $(PY) -m model_zoo.compat --repair && $(PY) -m model_zoo.compat --check; }
	touch $(STAMP)

# Fashion-MNIST (the offline default) from Debian; installs it when missing and we are root.
data:
	@if [ -f $(FMNIST_DIR)/t10k-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST found in $(FMNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)); \
	else \
	  echo "Fashion-MNIST is missing. Install it with:  sudo apt-get install -y dataset-fashion-mnist"; \
	fi

# Debian's chromium renders the HTML leaderboard in a test (headless); installed when root.
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then \
	  echo "chromium found"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)); \
	else \
	  echo "chromium is missing (the HTML leaderboard test will be skipped): sudo apt-get install -y chromium"; \
	fi

# Two single-thread pytest-xdist workers, one per core of the 2-core CI machine: 625 tests in
# 5 min 33 s this way (measured with the machine otherwise idle).
TEST_WORKERS ?= 2
test: setup data browser
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The main job: the leaderboard protocol on the shipped Fashion-MNIST zoo (reduced budgets,
# configs/eval/fmnist_zoo_demo.yaml), then the leaderboard, the paper's tables and figures.
# Resumable: run it again after an interruption; a finished run only re-reads its database.
# The demo's leaderboard goes into its own run folder ($(DEMO_LB)), never over the committed
# leaderboards/fashion_mnist-Linf/ (a fresh clone stays clean after `make demo`); `deqbench
# leaderboard` also writes the claims' verdicts (RUN/claims.md, copied beside the entries).
DEMO_RUN := runs/demo/fmnist_zoo_demo
DEMO_LB := $(DEMO_RUN)/leaderboard
demo: setup data
	$(VENV)/bin/deqbench leaderboard configs/eval/fmnist_zoo_demo.yaml --root $(DEMO_LB)
	$(VENV)/bin/deqbench tables $(DEMO_RUN)
	$(VENV)/bin/deqbench figures $(DEMO_RUN)
	$(VENV)/bin/deqbench export $(DEMO_RUN)
	cp $(DEMO_RUN)/figures/fig3a_deq_tiny_fmnist_trades_sec33__final.png $(DEMO_RUN)/figures/fig3c_deviation.png $(DEMO_LB)/fashion_mnist-Linf/
	@echo "leaderboard: $(DEMO_LB)/fashion_mnist-Linf/leaderboard.{md,csv,html}"
	@echo "tables, figures, claims, export: $(DEMO_RUN)/{tables,figures,claims.md,export.csv.gz}"

# Speed (the paper's Tables 9-10) on this machine, into the demo run's bench/ folder, where
# `deqbench tables` reads them: training samples/s with and without Sec. 3.3, inference over Tf x R.
bench: setup data
	$(VENV)/bin/deqbench bench train --config configs/train/fmnist_deq_tiny_pgdat.yaml --output $(DEMO_RUN)/bench/train.json
	$(VENV)/bin/deqbench bench forward --model deq_tiny_fmnist_trades_sec33 --output $(DEMO_RUN)/bench/forward.json
	@if [ -f $(DEMO_RUN)/results.sqlite ]; then $(VENV)/bin/deqbench tables $(DEMO_RUN); fi

# The one-shot GPU check for a short loan of one CUDA GPU (<= 8 min; benchmark/gpu_check.py):
# the tests marked cuda, bench forward / train of deq_large (fp32 and bf16 autocast) beside the
# paper's Tables 9-10, a few-image protocol run, a 2-process NCCL check with >= 2 GPUs. Writes one
# JSON ($(GPU_CHECK_OUT)); every step has its own time limit and a failing step never stops it.
# gpu-check-tiny: the same steps on the CPU at tiny sizes (what tests/test_gpu_check.py runs).
# No `setup` prerequisite: on a GPU machine without network the project's .venv is used when it
# exists, else that machine's python3 (with torch; torchdeq and pyautoattack carried as wheels).
GPU_CHECK_OUT ?= runs/gpu_check/gpu_check.json
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) -m benchmark.gpu_check --out $(GPU_CHECK_OUT)

gpu-check-tiny:
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(GPU_PY) -m benchmark.gpu_check --tiny --out runs/gpu_check/gpu_check_tiny.json

# Re-train and re-publish the shipped Fashion-MNIST zoo (hours on a 2-core CPU; see README).
# Each entry of ZOO_RUNS is RUN[+RUN...]:NAME: the runs are trained in order (each continues the
# one before it, see their init_from) and the last is published under NAME. The order of the
# entries matters: fmnist_deq_tiny_standard (3 clean epochs, not published itself) starts the
# shipped standard model and the PGD-AT + Sec. 3.3 DEQ; PGD-AT, TRADES and TRADES + Sec. 3.3
# start from the published standard model; the TRADES runs get one more epoch (*_ft).
ZOO_RUNS := fmnist_deq_tiny_standard+fmnist_deq_tiny_standard_ft:deq_tiny_fmnist_standard \
            fmnist_deq_tiny_pgdat_sec33:deq_tiny_fmnist_pgdat_sec33 \
            fmnist_deq_tiny_pgdat:deq_tiny_fmnist_pgdat \
            fmnist_deq_tiny_trades+fmnist_deq_tiny_trades_ft:deq_tiny_fmnist_trades \
            fmnist_deq_tiny_trades_sec33+fmnist_deq_tiny_trades_sec33_ft:deq_tiny_fmnist_trades_sec33 \
            fmnist_small_cnn_pgdat:small_cnn_fmnist_pgdat
zoo: setup data
	for entry in $(ZOO_RUNS); do \
	  runs=$${entry%%:*}; name=$${entry##*:}; \
	  for run in $${runs//+/ }; do \
	    $(VENV)/bin/deqbench train configs/train/$$run.yaml || exit 1; \
	  done; \
	  $(VENV)/bin/deqbench zoo publish --run runs/train/$$run --config configs/train/$$run.yaml --name $$name || exit 1; \
	done

# The committed leaderboard (leaderboards/fashion_mnist-Linf/): the demo's protocol on 1,000
# images (configs/eval/fmnist_zoo_1000.yaml, ~13 CPU-hours) and the full grid / standard
# AutoAttack on 100 of them (configs/eval/fmnist_zoo_1000_full.yaml). Resumable over sessions
# from COMMITTED state: every finished unit is archived under results/ and committed (git) at
# most every 10 minutes, so run it again after any interruption, even in a fresh clone. When
# both runs are complete, the leaderboard folder is re-rendered from results/ alone
# (benchmark/publish.py); `make leaderboard-check` (also a test) verifies the committed folder
# is exactly that rendering.
leaderboard: setup data
	$(VENV)/bin/deqbench evaluate configs/eval/fmnist_zoo_1000.yaml
	$(VENV)/bin/deqbench evaluate configs/eval/fmnist_zoo_1000_full.yaml
	$(PY) -m benchmark.publish

leaderboard-check: setup data
	$(PY) -m benchmark.publish --check

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
