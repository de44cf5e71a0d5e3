# Two commands do all the set-up on a fresh clone:
#   make serve   serve the shipped models (gRPC 8001, metrics 8002)
#   make test    lint, format check and the whole test suite
PYTHON ?= python3
SERVE_VENV := .venv
TEST_VENV := .venv-test

.PHONY: serve test train-speaker train-langid verify proto clean

$(SERVE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/pip install --quiet -e .
	touch $@

$(TEST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/pip install --quiet --upgrade pip
	$(TEST_VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

serve: $(SERVE_VENV)/.installed
	$(SERVE_VENV)/bin/lstm-serve $(ARGS)

test: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/ruff check .
	$(TEST_VENV)/bin/ruff format --check .
	$(TEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

train-speaker: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/lstm-export train speaker-vowels --out models

train-langid: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/lstm-export train langid-chars --out models

verify: $(TEST_VENV)/.installed
	for m in models/*/*/; do $(TEST_VENV)/bin/lstm-export verify $$m || exit 1; done

proto: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python tools/codegen.py

clean:
	rm -rf $(SERVE_VENV) $(TEST_VENV)
