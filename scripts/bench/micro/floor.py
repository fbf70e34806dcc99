"""Attach empty BPF programs to the hooks accept-watch uses in tracepoint mode, until SIGINT.

The bench's `floor` mode: what the hooks cost before accept-watch does any work in them. The hook
list is accept-watch's own (probes/kernel.py, and the same choice of sys_enter or not), so the two
cannot drift apart; floor.c must define a program for each (BCC fails to attach a missing one, loudly).
Usage (root): .venv/bin/python scripts/bench/micro/floor.py [--no-inflight]
"""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path

from accept_watch.probes.kernel import (
    ENTER_TRACEPOINT_FNS,
    RAW_TRACEPOINT_FNS,
    TRACEPOINT_FNS,
    manual_attach_bpf,
)
from accept_watch.probes.offsets import load_layout


def main() -> int:
    # Launched from a shell's background job, SIGINT arrives ignored and Python would not install its
    # handler: the bench's SIGINT would then never stop us.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    bpf = manual_attach_bpf(src_file=str(Path(__file__).with_name("floor.c")).encode())
    # As accept-watch in tracepoint mode on this kernel: sys_enter only where the listening fd cannot
    # be read at syscall exit.
    tracepoints = dict(TRACEPOINT_FNS)
    if not load_layout().listener_from_regs:
        tracepoints.update(ENTER_TRACEPOINT_FNS)
    for tp, fn in tracepoints.items():
        bpf.attach_tracepoint(tp=tp.encode(), fn_name=fn)
    # --no-inflight: as accept-watch --no-inflight, without the state-change tracepoint.
    raw = {} if "--no-inflight" in sys.argv[1:] else RAW_TRACEPOINT_FNS
    for tp, fn in raw.items():
        bpf.attach_raw_tracepoint(tp=tp.encode(), fn_name=fn)
    hooks = len(tracepoints) + len(raw)
    print(f"floor: attached empty programs on {hooks} hooks", file=sys.stderr, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        signal.pause()
    bpf.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
