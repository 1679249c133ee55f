# `make bench` / `make test` set up a project-local environment (.venv), install torch and the
# package with its compiled extension, then run the benchmark table / the test suite.
# Both are idempotent: a second run only rebuilds what changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch to install when the environment has none. Pinned so a CPU-only machine gets the
# CPU build; on a GPU machine pick the build matching your driver, e.g. TORCH_SPEC="torch==2.11.0".
TORCH_SPEC ?= torch==2.13.0
DEPS := numpy ninja pybind11 setuptools wheel "triton>=3.0" pytest pytest-benchmark hypothesis expecttest matplotlib tqdm safetensors pyyaml scikit-learn
# peft for the parity tests of the PEFT-style merge helpers (it brings transformers, pure Python);
# mergekit for tests/test_mergekit_real.py and bench/bench_merge.py (pinned: the tests compare with
# this release's math; it keeps torch==2.13.0 and adds datasets/pandas/pyarrow, ~11 s of install)
TEST_DEPS := peft mergekit==0.1.5
# timm for the ModelEMA parity tests, without its dependencies: they include torchvision, whose pin
# would replace the torch above (the tests load timm/utils/model_ema.py, which needs torch only)
TEST_DEPS_NO_DEPS := timm==1.0.31
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' 2>/dev/null)

.PHONY: test bench demo clean info

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: $(PY) Makefile
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)" $(DEPS) $(TEST_DEPS)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(TEST_DEPS_NO_DEPS)
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

test: $(VENV)/.built
	$(PY) -m pytest tests -q

bench: $(VENV)/.built
	$(PY) -m bench.run

# NTK-CL vs fine-tuning / L2 / EWC on scikit-learn's digits, offline on CPU (a few minutes)
demo: $(VENV)/.built
	$(PY) -m ntkcl_fast.ntkcl.demo

info: $(VENV)/.built
	$(PY) -m ntkcl_fast info

clean:
	rm -rf $(VENV) build build-cmake ntkcl_fast/_C*.so *.egg-info
