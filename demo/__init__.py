"""The demo harness: a bundled gunicorn app, a load generator and the `make demo` driver. It stands
apart from the shipped package (accept_watch.*): run it from the repository (`python -m demo`)."""
