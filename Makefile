# The README's two commands: `make demo` and `make test`. Both set everything up first.
PY := .venv/bin/python
SETUP := bash scripts/setup.sh

.PHONY: setup demo test lint bench kernel-matrix clean

setup:
	@$(SETUP)

demo: setup
	@$(PY) -m accept_watch.daemon.demo $(DEMO_ARGS)

test: setup
	@$(PY) -m ruff check .
	@$(PY) -m pytest -ra $(PYTEST_ARGS)

lint: setup
	@$(PY) -m ruff check .

bench: setup
	@$(PY) -m accept_watch.daemon.bench

clean:
	rm -rf .venv .pytest_cache build *.egg-info
