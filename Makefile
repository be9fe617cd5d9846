# The README's two commands: `make demo` and `make test`. Each sets up everything it needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
ART ?= artifacts

.PHONY: setup test demo assets lint bench bench-dg clean

# torch (tests only) is PyTorch's CPU build, from PyTorch's wheel index as its install docs describe;
# installed first and on its own, so only this one step looks at that index (a short retry budget:
# where the index cannot be reached pip says so and falls back to the other indexes). TORCH_INDEX=
# skips it.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PIN := $(shell grep -E '^torch==' constraints.txt)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip==26.3"
	$(BIN)/pip install --quiet --no-deps --retries 1 --timeout 30 \
	  $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[tests,eval]"
	touch $(STAMP)

setup: $(STAMP)

assets: setup
	$(BIN)/python -m hilora_jax.io.assets

# The suite runs in TEST_WORKERS processes (pytest-xdist), each test file whole in one of them
# (`--dist loadfile`: a file's module fixtures are built once). Two workers on CI's 2 cores: one
# compiles (single-threaded) while the other runs; 25 -> 17 min on a 2-core AMD EPYC.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: setup
	$(BIN)/python -m hilora_jax.io.assets
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

lint: setup
	$(BIN)/ruff check hilora_jax convert tests benchmarks

demo: setup
	$(BIN)/python -m hilora_jax.io.assets --only smollm2 --only minilm --only bigbench
	test -f $(ART)/smollm2-135m-instruct/hilora_model.json || \
	  $(BIN)/hilora convert-model smollm2 $(ART)/smollm2-135m-instruct
	$(BIN)/hilora generate --model $(ART)/smollm2-135m-instruct \
	  --prompt "What is the capital of France?" --max-new-tokens 24
	$(BIN)/python -m hilora_jax.demo --model $(ART)/smollm2-135m-instruct --out $(ART)/demo

bench: setup
	$(BIN)/python benchmarks/throughput.py

# The BIG-bench domain-generalization benchmark (benchmarks/bigbench_dg/README.md); one device.
DG_ARGS ?= --variant hilora-gamma1=hilora:gamma=1.0 --variant hilora-kappa1=hilora:kappa=none \
  --variant hilora-llm=hilora:embedder=llm --variant hilora-paper=hilora:preset=paper
$(VENV)/.installed-bench: $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[tests,eval,bench]"
	touch $@

bench-dg: $(VENV)/.installed-bench
	$(BIN)/python -m hilora_jax.io.assets --only smollm2 --only minilm --only bigbench
	XLA_FLAGS= $(BIN)/python benchmarks/bigbench_dg/run.py $(DG_ARGS)

clean:
	rm -rf $(VENV) $(ART)
