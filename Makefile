# The few commands a newcomer needs. Everything runs inside .venv, created on demand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: install demo test typecheck bench bench-accelerator clean

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

# The typed contracts: every registry row against the protocols it names (mypy.ini). A
# contract change that misses a row fails here (and in CI) before any test runs.
typecheck: install
	$(PY) -m mypy

# Step speed and MFU, input pipeline, checkpoint cost, the PyTorch / Hugging Face peer, the
# step's parts beside torch's kernels and where the step's time goes (per-op profiles),
# decoding beside GPT-2 with its key/value cache (the peer's extra, torch CPU + transformers, is installed here only). Figures go to benchmarks/RESULTS.md.
bench: install
	$(PY) -m pip install -q -e ".[peer]"
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/checkpoint.py
	$(PY) benchmarks/ehr_scale.py
	$(PY) benchmarks/soma_scale.py
	$(PY) benchmarks/motor_cindex.py
	$(PY) benchmarks/peer.py --config=configs/ehr_bert.py:demo
	$(PY) benchmarks/step_parts.py --preset=demo
	$(PY) benchmarks/step_parts.py --preset=base
	$(PY) benchmarks/profile_step.py --config=configs/ehr_bert.py:demo
	$(PY) benchmarks/profile_step.py --config=configs/multimodal_fusion.py:demo
	$(PY) benchmarks/record_finetune.py
	$(PY) benchmarks/record_finetune.py --spec=configs/ecg_mae.py:tiny --label=afib --set=data.ecg.length=1000 --set=data.ecg.patch_size=50
	$(PY) benchmarks/import_memory.py
	$(PY) benchmarks/ehr_order_trend.py --finetune_set=task.embedding=ehr/last_visit_embedding
	$(PY) benchmarks/generate.py --preset=demo --rows=8 --prompt=96 --new=32
	$(PY) benchmarks/generate.py --preset=base --rows=8 --prompt=384 --new=128 --repeats=2

# On one GPU, in under 8 minutes: MFU at ehr_bert.py:base in bf16 (layers scanned and
# unrolled), packed vs unpacked EHR tokens/s, attention implementations side by side, the
# PyTorch peer on the same GPU where torch for it is installed, the image pipelines against
# their steps (augmentation on host and device) and multimodal batches mixed vs by pattern.
# One JSON file of figures.
bench-accelerator: install
	$(PY) -m pip install -q -e ".[cuda]"
	$(PY) benchmarks/accelerator.py --out=benchmarks/accelerator.json

clean:
	rm -rf runs .pytest_cache
