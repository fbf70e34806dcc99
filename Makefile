# The README's two commands: `make demo` and `make test`. Both set everything up first.
PY := .venv/bin/python
SETUP := bash scripts/setup.sh

.PHONY: setup demo test lint bench bench-serve kernel-matrix containers clean

setup:
	@$(SETUP)

demo: setup
	@$(PY) -m demo $(DEMO_ARGS)

test: setup
	@$(PY) -m ruff check .
	@$(PY) -m pytest -ra $(PYTEST_ARGS)

lint: setup
	@$(PY) -m ruff check .

# Every probe path on stock Debian kernels (5.10, 6.1, 6.12) under QEMU; image cached in
# ~/.cache/accept-watch/. Exit 3 = Debian/PyPI packages could not be fetched (not a test failure).
kernel-matrix:
	@python3 scripts/kernel-matrix/run_matrix.py $(KM_ARGS)

# The container image (Debian packages + this tree's wheel; roots cached in ~/.cache/accept-watch/containers)
# and the podman tests: a containerised gunicorn watched from the host, the image watching a host gunicorn,
# the DaemonSet checked. `make test` runs the same tests. Exit 3 from the build: packages unreachable.
containers: setup
	@$(PY) scripts/containers/container_build.py
	@$(PY) -m pytest -ra tests/test_containers.py tests/test_kubernetes_manifest.py tests/test_procident.py

bench: setup
	@$(PY) scripts/bench.py $(BENCH_ARGS)

# accept-watch serve under --max-requests churn: RSS and pid series sampled over time (docs/bench-serve.md)
bench-serve: setup
	@$(PY) scripts/bench/serve_churn.py $(BENCH_SERVE_ARGS)

clean:
	rm -rf .venv .pytest_cache build *.egg-info
