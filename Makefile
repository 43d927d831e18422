# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
# tests/test_promptlayer.py runs again against the other supported PromptLayer SDK line.
PL14_VENV := .venv-pl14
PL14_STAMP := $(PL14_VENV)/.installed-test

.PHONY: demo test test-pl14 lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(TEST_STAMP): pyproject.toml $(RUN_STAMP)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: $(RUN_STAMP)
	$(BIN)/otel-metadata demo

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy src

test: lint
	$(BIN)/pytest
	$(MAKE) test-pl14

# The test extra pins promptlayer 1.5.16; the second install replaces it with 1.4.7.
$(PL14_STAMP): pyproject.toml
	$(PYTHON) -m venv $(PL14_VENV)
	$(PL14_VENV)/bin/python -m pip install -q -e '.[test]'
	$(PL14_VENV)/bin/python -m pip install -q 'promptlayer==1.4.7'
	$(PL14_VENV)/bin/python -c "from importlib.metadata import version as v; assert v('promptlayer') == '1.4.7', v('promptlayer')"
	touch $@

test-pl14: $(PL14_STAMP)
	$(PL14_VENV)/bin/pytest -q tests/test_promptlayer.py

bench: $(TEST_STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(PL14_VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
