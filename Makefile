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

.PHONY: setup train test bench clean llama-cpp wheelhouse setup-offline offline-check gpu-check

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
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -ra --durations=30 tests

# Optional: llama.cpp's Python binding, for the test that runs the GGUF export in llama.cpp. PyPI has
# only its source; the build takes about 10 minutes on 2 cores (seconds from pip's cache afterwards).
llama-cpp: setup
	$(PY) -m pip install -q --disable-pip-version-check llama-cpp-python==0.3.36

# Air-gapped nodes (README): `make wheelhouse` where there is package access writes the wheels a node needs
# for its Python (PYTHON_VERSION) besides its own torch (HAVE: the node's `pip list --format=freeze`, to
# ship only what it lacks; NODE_TORCH: its torch version, if HAVE does not say); `make setup-offline` on
# the node installs them with no index into .venv, over the Python that holds the node's torch
# (SITE_PYTHON), which stays as it is.
WHEELHOUSE ?= wheelhouse
PYTHON_VERSION ?= $(shell python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
SITE_PYTHON ?= python3

wheelhouse:
	python3 tools/wheelhouse.py build --out $(WHEELHOUSE) --python-version $(PYTHON_VERSION) $(if $(HAVE),--have $(HAVE)) \
		$(if $(NODE_TORCH),--torch $(NODE_TORCH))

setup-offline:
	$(SITE_PYTHON) tools/wheelhouse.py install --wheelhouse $(WHEELHOUSE) --python $(SITE_PYTHON) --venv $(VENV)
	touch $(STAMP)

# Both of the above, proved on this machine for a given torch (2.11.0: the oldest supported; only 2.13.0
# has a CPU-only wheel here, other versions bring CUDA libraries they do not use on CPU): a wheelhouse for
# this Python, an environment holding torch==$(TORCH_VERSION) alone, the offline install into a venv over
# it, and a representative subset of the tests run there (model forward/backward, a 2-rank DeepSpeed
# ZeRO-1 step against one process, the Triton kernels in the interpreter, generation, the GPU check's
# CPU mode).
TORCH_VERSION ?= 2.13.0
CHECK_DIR = runs/offline-check/torch-$(TORCH_VERSION)
# Triton 3.6 (torch 2.11's) interprets kernels on CPU only with NumPy < 2.4 (model/kernels/dispatch.py).
SITE_EXTRA = $(if $(filter 2.11.%,$(TORCH_VERSION)),"numpy<2.4")
COMPAT_TESTS = tests/test_model.py tests/test_throughput.py tests/test_kernels_ce.py tests/test_kernels_mse.py tests/test_gpu_check.py \
	"tests/test_parallel_parity.py::test_parallel_layouts_match_one_process[zero1-2-sets0]" \
	tests/test_generate.py::test_a_row_of_a_batch_is_what_its_prompt_gives_alone \
	tests/test_generate.py::test_the_image_is_read_and_text_rows_ignore_it \
	tests/test_generate.py::test_end_of_sequence_stop_strings_and_sampling

offline-check:
	python3 tools/wheelhouse.py build --out $(CHECK_DIR)/wheelhouse --torch $(TORCH_VERSION)
	test -x $(CHECK_DIR)/site/bin/python || python3 -m venv $(CHECK_DIR)/site
	$(CHECK_DIR)/site/bin/python -m pip install -q --disable-pip-version-check torch==$(TORCH_VERSION) $(SITE_EXTRA)
	python3 tools/wheelhouse.py install --wheelhouse $(CHECK_DIR)/wheelhouse --python $(CHECK_DIR)/site/bin/python \
		--venv $(CHECK_DIR)/venv
	OMP_NUM_THREADS=1 $(CHECK_DIR)/venv/bin/python -m pytest -q -ra -p no:cacheprovider $(COMPAT_TESTS)

# Every GPU-only path once on this machine's GPU, at most 8 minutes on an H100 (bench/gpu_check.py):
# bench/results/gpu_check_<gpu>.json and RESULT lines. Without CUDA it reports each check skipped.
gpu-check: setup
	$(PY) bench/gpu_check.py

bench: setup
	$(PY) bench/trainer_overhead.py

clean:
	rm -rf $(RUN_DIR)
