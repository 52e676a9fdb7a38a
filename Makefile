# The few commands a newcomer needs. Everything runs inside .venv, created on demand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: install demo test bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Generates a synthetic multimodal cohort (EHR, images, expression, feature tables of the
# same subjects, each modality missing for some) in the run directory and pre-trains a
# fused model on it; then reports cross-modal retrieval on held-out subjects.
demo: install
	$(PY) experiments/pretrain.py --config=configs/multimodal_fusion.py:demo --workdir=$(DEMO_DIR)

test: install
	$(PY) -m pytest -x -n 2 --dist loadfile tests

bench: install
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/checkpoint.py

clean:
	rm -rf runs .pytest_cache
