# Set-up is two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned: on these machines 2.13.0 is the CPU wheel on disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
DEMO_OUT ?= runs/demo

.PHONY: install demo test docs quality clean

$(BIN)/ness: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(BIN)/ness

install: $(BIN)/ness

demo: install
	$(BIN)/ness demo --out $(DEMO_OUT)

test: install docs
	$(BIN)/python -m pytest -q

# The documentation site (MkDocs, Material theme, API pages from the docstrings), built strictly: a broken link, a
# page missing from the navigation or an unresolved reference fails the build, and so `make test`.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

quality: install
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

clean:
	rm -rf $(VENV) runs build src/*.egg-info .pytest_cache .ruff_cache
