# The README's two commands: `make demo` and `make test`. Both set everything up first.
PY := .venv/bin/python
SETUP := bash scripts/setup.sh

.PHONY: setup demo test lint bench bench-serve bench-startup kernel-matrix containers install-check systemd-check clean

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

# The wheel, and nothing else of the repository, on Debian 12 and Debian 13 (each booting its own
# kernel with systemd, under QEMU; roots cached in ~/.cache/accept-watch/install-check/): pipx and
# venv installs with Debian's BCC, doctor's fixes run verbatim, --dry-run, an exact gunicorn count, and
# deploy/systemd/accept-watch.service under real systemd with exactly its declared capabilities.
# Exit 3 = Debian/PyPI packages could not be fetched (not a test failure).
install-check: setup
	@python3 scripts/install-check/run.py $(IC_ARGS)

# Only the systemd unit's guest (Debian 13, kernel 6.12): the install steps it needs, then the unit.
systemd-check: setup
	@python3 scripts/install-check/run.py --suites trixie --checks install,systemd $(IC_ARGS)

bench: setup
	@$(PY) -m scripts.bench $(BENCH_ARGS)

# accept-watch serve under --max-requests churn: RSS and pid series sampled over time (docs/bench-serve.md)
bench-serve: setup
	@$(PY) scripts/bench/serve_churn.py $(BENCH_SERVE_ARGS)

# Launch -> attached phase by phase and RSS once attached, this tree vs an earlier commit, interleaved
# (docs/bench-startup.md; a few minutes)
bench-startup: setup
	@$(PY) scripts/bench_startup.py $(BENCH_STARTUP_ARGS)

clean:
	rm -rf .venv .pytest_cache build *.egg-info
