# Two entry points, each self-installing and idempotent: `make train`, `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR := runs/tiny
CONFIG := pretrain/configs/tiny.yaml
CURRICULUM := pretrain/configs/tiny_curriculum.yaml
NPROC ?= 2
# The launcher's rendezvous port, free when the recipe runs: its default (29500) clashes with any
# other distributed job on the machine.
PORT = $(shell python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

.PHONY: setup train test bench clean llama-cpp

setup: $(STAMP)

# The stamp depends on the dependency files, so editing them reinstalls; otherwise nothing runs.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# The main job: the embedded corpus (this machine's Python standard library, generated image -> code
# pairs, generated instruction chats), a tokenizer and shards, then the four-stage VL-JEPA curriculum
# on a tiny model on $(NPROC) CPU ranks under the DeepSpeed launcher. Every step skips work done
# before; `make clean` starts over.
train: setup
	$(PY) tools/stdlib_corpus.py --output $(RUN_DIR)/corpus
	$(PY) tools/make_vision_pairs.py --output $(RUN_DIR)/vision_pairs --count 800 --samples-per-shard 100
	$(PY) tools/make_instructions.py --output $(RUN_DIR)/instructions --pairs $(RUN_DIR)/vision_pairs --count 1500
	$(PY) tools/train_tokenizer.py --config $(CONFIG) --input $(RUN_DIR)/corpus --output $(RUN_DIR)/tokenizer.json
	$(PY) tools/build_shards.py --config $(CONFIG) --input $(RUN_DIR)/corpus --source vision_text=$(RUN_DIR)/vision_pairs \
		--tokenizer $(RUN_DIR)/tokenizer.json --output $(RUN_DIR)/shards
	$(PY) tools/build_shards.py --config $(CONFIG) --input $(RUN_DIR)/instructions/code_edits.jsonl \
		--source vision_text=$(RUN_DIR)/instructions/vision_qa --tokenizer $(RUN_DIR)/tokenizer.json \
		--output $(RUN_DIR)/instructions/shards
	OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus $(NPROC) --master_port $(PORT) pretrain/curriculum.py \
		--curriculum $(CURRICULUM)

# The C++ export reader (tools/cpp/, standard library only) is built first: the tests run it.
test: setup
	$(MAKE) -s -C tools/cpp
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -ra tests

# Optional: llama.cpp's Python binding, for the test that runs the GGUF export in llama.cpp. PyPI has
# only its source; the build takes about 10 minutes on 2 cores (seconds from pip's cache afterwards).
llama-cpp: setup
	$(PY) -m pip install -q --disable-pip-version-check llama-cpp-python==0.3.36

bench: setup
	$(PY) bench/trainer_overhead.py

clean:
	rm -rf $(RUN_DIR)
