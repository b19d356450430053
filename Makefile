# Every target runs inside .venv/ (created by `make setup`).
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.setup-stamp

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

# torch first, alone (the CPU wheel on CPU machines), then everything else with a
# constraint that keeps that torch. A second `make setup` is a no-op.
$(STAMP): pyproject.toml requirements/constraints.txt Makefile tools/fetch_tcmalloc.py
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install --quiet --disable-pip-version-check torch==2.13.0
	$(PIP) install --quiet --disable-pip-version-check -c requirements/constraints.txt -e '.[test]'
	$(PY) tools/fetch_tcmalloc.py
	touch $(STAMP)

demo: setup
	bash examples/lora/run-smollm2-135m-lora.sh

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) benchmarks/lora_vs_full.py

clean:
	rm -rf .venv build *.egg-info
