# genlab: `make demo` (a short VAE training + the ELBO-vs-IWAE table) and `make test`.
# Both create .venv and install genlab with its dev extras first.
# TORCH=cpu installs PyTorch's CPU-only wheels (~0.2 GB) from PyTorch's own index instead of
# the default CUDA build from PyPI (~6 GB with its NVIDIA libraries); it needs that index online.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= $(or $(GENLAB_DATA),../shared/data)
DEMO_OUT ?= runs/demo
TORCH ?=
CPU_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: venv demo test test-slow clean notebook

$(BIN)/genlab-train: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(filter cpu,$(TORCH)),$(BIN)/python -m pip install -q torch torchvision --index-url $(CPU_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/genlab-train

demo: venv
	rm -rf $(DEMO_OUT)
	$(BIN)/python -m inference vae --epochs 10 --latent-dim 20 --data-dir $(DATA) --out $(DEMO_OUT) --seed 0
	$(BIN)/python -m evaluation $(DEMO_OUT) --k 1,10,100,1000 --limit 1000 --seed 0

test: venv
	GENLAB_DATA=$(DATA) $(BIN)/python -m pytest -q

test-slow: venv
	GENLAB_DATA=$(DATA) $(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs *.egg-info

# Execute one notebook in place on real runs (runs/ by default): NB=vae_mnist (see README for
# how long each takes); missing runs are trained first, with progress on the terminal.
NB ?= vae_mnist
notebook: venv
	$(BIN)/python -m pip install -q -e ".[notebooks]"
	GENLAB_DATA=$(abspath $(DATA)) GENLAB_RUNS=$(abspath runs) $(BIN)/python notebooks/run.py $(NB)

# Table 1 of the IWAE paper (issue 15): trains every missing cell resumably, writes RESULTS.md.
# BUDGET=N passes per cell (default: the paper's 3,280); REPRODUCE_ARGS for more options.
.PHONY: reproduce
reproduce: venv
	GENLAB_DATA=$(DATA) $(BIN)/python -m evaluation.reproduce --data-dir $(DATA) --results RESULTS.md $(if $(BUDGET),--budget $(BUDGET)) $(REPRODUCE_ARGS)
