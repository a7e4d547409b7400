# medidiff: `make demo` runs the main job, `make test` runs the test suite.
# Each creates .venv if missing and installs everything it needs, so a fresh clone needs
# only python3 and make.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The torch release medidiff is tested with. On the CI machines this resolves to a CPU build
# that lies on local disk; on a user's Linux machine the same pin pulls PyPI's CUDA build.
TORCH_VERSION ?= 2.13.0
STAMP  := $(VENV)/.medidiff-installed

.PHONY: demo test test-fast install clean-venv sample-data

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# the main job: default models on sample_data -> demo_out/report.html (a rerun replaces it)
demo: $(STAMP)
	$(VENV)/bin/medidiff demo --out demo_out --overwrite

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -m "not slow"

sample-data: $(STAMP)
	$(PY) -m pip install -q -e ".[test,sample]"
	$(PY) pipelines/make_sample_data.py --out sample_data

clean-venv:
	rm -rf $(VENV)
