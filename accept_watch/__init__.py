"""accept-watch: which worker of a pre-fork server accepts each connection, measured with eBPF.

Data flows probes -> daemon -> dashboard/export:
  accept_watch.probes     kernel-facing: BPF C, BTF offsets, BCC loading (the only place bcc is imported)
  accept_watch.daemon     plain Python: discovery, aggregation, export, CLI
  accept_watch.dashboard  the live web page and HTTP API
"""

__version__ = "0.1.0"
