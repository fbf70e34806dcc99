"""The running daemon: checks, attach, the read loop, outputs, clean shutdown.

Order matters: everything that can be refused (arguments, export paths, the pid, privileges, BTF,
listening sockets) is checked before a single probe is attached, so bad input never leaves
anything behind; once attached, SIGINT/SIGTERM detach, flush the export and exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import psutil

from accept_watch.probes import environment
from accept_watch.probes.records import KernelSnapshot, ProbeKind

from . import discovery, export, follow, target, waitmode
from .backstop import Backstop
from .blocked import blocked_workers
from .exportsink import ExportSink
from .roles import assign_roles
from .sanitize import clean

if TYPE_CHECKING:  # imported at run time only where used: they pull in bcc and the web stack
    from accept_watch.dashboard.server import DashboardServer
    from accept_watch.probes.kernel import AcceptProbes

    # The document model (pydantic) and what builds on it: imported once the compile runs (_run).
    from .published import PublishedDocument
    from .stats import Aggregator

EXPORT_EVERY_S = 5.0
# A full re-scan (psutil walks every process of the machine for the tree, then the fd tables) every
# REFRESH_EVERY_S; in between, every CHECK_EVERY_S, a cheap look for a reason to re-scan now.
REFRESH_EVERY_S = 10.0
CHECK_EVERY_S = 2.0
WAIT_MODE_EVERY_S = 10.0
BLOCKED_EVERY_S = 1.0


class WatchError(Exception):
    """One-line reason to stop before or while attaching."""


def _err(message: str) -> int:
    print(f"accept-watch: error: {clean(message)}", file=sys.stderr)
    return 1


def run_watch(args: argparse.Namespace) -> int:
    from accept_watch.probes.btf import BtfError
    from accept_watch.probes.kernel import ProbeError

    try:
        return _run(args)
    except (WatchError, discovery.DiscoveryError, export.ExportError, environment.EnvironmentProblem,
            ProbeError, BtfError) as exc:
        return _err(str(exc))


def _check_outputs(args: argparse.Namespace) -> None:
    if args.export is not None:
        export.check_writable(args.export, "export")
    if args.events is not None:
        export.check_writable(args.events, "events")


def _target_pid(args: argparse.Namespace) -> int:
    """--pid, else the pid in --pidfile."""
    pid = args.pid
    if pid is None:
        pid = discovery.read_pidfile(args.pidfile)
        if pid is None:
            raise WatchError(f"no process id in {clean(args.pidfile[:200])}")
    if not psutil.pid_exists(pid):
        raise WatchError(f"no process with pid {pid}")
    try:
        target.check_master(pid)  # before a worker's pid is resolved to its master: a thread id is not one
    except target.TargetError as exc:
        raise WatchError(str(exc)) from None
    return pid


def _select_ports(topology: discovery.Topology, wanted: list[int] | None) -> list[int]:
    ports = sorted({lst.port for lst in topology.listeners})
    if not wanted:
        return ports
    missing = sorted(set(wanted) - set(ports))
    if missing:
        raise WatchError(
            f"pid {topology.master_pid} does not listen on port {', '.join(map(str, missing))} "
            f"(it listens on {', '.join(map(str, ports))})"
        )
    return sorted(set(wanted))


def _run(args: argparse.Namespace) -> int:
    from accept_watch.probes.kernel import AcceptProbes
    from accept_watch.probes.offsets import load_layout

    if args.events_sample != 1 and args.events is None:
        raise WatchError("--events-sample needs --events FILE")
    pid = _target_pid(args)
    _check_outputs(args)
    if args.print_bpf:
        environment.require_btf()
        print(AcceptProbes(load_layout(str(environment.BTF_PATH))).program)
        return 0
    environment.require_privileges()
    environment.require_btf()
    master, note = discovery.resolve_master(pid)
    if note:
        print(f"accept-watch: {note}", file=sys.stderr)
    topology = discovery.discover(master)
    ports = _select_ports(topology, args.port)
    topology = follow.only_ports(topology, set(args.port) if args.port else None)
    environment.ensure_tracing_mounts()
    layout = load_layout(str(environment.BTF_PATH))
    # Compiling is most of the launch: it runs on its own thread from here, while the work below
    # (samples, the dashboard's import and bind) goes on. From here to the attach nothing may print
    # to stderr (AcceptProbes.compile_in_background); errors are raised, and printed after the join.
    probes = AcceptProbes(layout, emit_events=args.events is not None or args.stream,
                          inflight=not args.no_inflight)
    with probes:
        probes.compile_in_background()
        return _prepare_and_watch(args, probes, topology, ports)


def _prepare_and_watch(args: argparse.Namespace, probes: AcceptProbes, topology: discovery.Topology,
                       ports: list[int]) -> int:
    # Imported here, not at the top: ~0.1 s of pydantic and the analysis, overlapping the compile.
    from .published import PublishedDocument
    from .stats import Aggregator

    probe = None if args.probe == "auto" else ProbeKind(args.probe)
    # The aggregator's clock starts before the probes count anything, so the first interval's rate
    # covers exactly the time the probes were attached.
    aggregator = Aggregator(topology, probe="pending", probe_detail="", kernel=os.uname().release)
    wait_modes = WaitModes(topology)  # first sample before attaching, while the server runs as usual
    # Signals are caught from before the attach: a Ctrl-C right after the "attached" line must still
    # detach, write the export and exit 0 (not die with 130 and lose what was counted).
    stop = threading.Event()
    # The dashboard's address is taken now (port in use, address not on this host): refused before
    # a single probe is attached. It starts serving once the probes count.
    published = PublishedDocument(aggregator.model(), aggregator.recent_events)
    dashboard = None if args.no_dashboard or args.dry_run else _bind_dashboard(args, published)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _attach_and_watch(args, probes, probe, topology, aggregator, wait_modes,
                                 ports, stop, published, dashboard)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if dashboard is not None:
            dashboard.close()


def _attach_and_watch(args: argparse.Namespace, probes: AcceptProbes, probe: ProbeKind | None,
                      topology: discovery.Topology, aggregator: Aggregator, wait_modes: WaitModes,
                      ports: list[int], stop: threading.Event, published: PublishedDocument,
                      dashboard: DashboardServer | None = None) -> int:
    with probes:  # detached whatever happens
        result = probes.attach(probe, topology.processes.keys(), ports)
        if args.port:
            probes.only_watched_ports(True)
        aggregator.set_probe(result.kind.value, result.detail)
        failed = [f"{a.kind}: {a.error}" for a in result.attempts if not a.ok]
        print(f"accept-watch: probe {result.kind} ({result.detail}); compiled in {result.compile_s:.2f} s, "
              f"attached in {result.attach_s:.2f} s", file=sys.stderr)
        for line in failed:
            print(f"accept-watch: not used: {clean(line)}", file=sys.stderr)
        if args.dry_run:
            print(f"accept-watch: dry run OK: probe {result.kind}, {len(topology.processes)} processes, "
                  f"ports {', '.join(map(str, ports))}")
            return 0
        # After the primary hook is attached: a thread found inside accept() from here on either
        # entered it before (the backstop will see its exit) or after (the primary sees it).
        backstop = Backstop(probes, result.kind, topology.processes.keys(), time.monotonic())
        aggregator.backstop = backstop.to_doc()
        return _loop(args, probes, topology, aggregator, wait_modes, stop, backstop, published, dashboard)


def _loop(args: argparse.Namespace, probes: AcceptProbes, topology: discovery.Topology,
          aggregator: Aggregator, wait_modes: WaitModes, stop: threading.Event, backstop: Backstop,
          published: PublishedDocument, bound: DashboardServer | None = None) -> int:
    from accept_watch.probes.kernel import ProbeError

    from . import analysis, terminal
    from .eventdrain import EventDrainer

    def publish(ended: bool = False) -> dict[str, Any]:
        """aggregator -> document -> analysis -> the views' copy; the dict every view renders."""
        doc = analysis.analyzed(aggregator.model(ended), wait_modes.current())
        return published.publish(doc).to_dict()

    only = set(args.port) if args.port else None
    publish()
    screen = _Screen(sys.stdout.isatty() and not args.quiet)
    blocked = BlockedSampler()
    events = args.events is not None or args.stream
    writer = (export.EventWriter(args.events, clock=aggregator.clock, ports=only, sample=args.events_sample)
              if args.events else None)
    drainer = EventDrainer(probes, writer, aggregator, only) if events else None
    dashboard = None
    sink = _export_sink(args, aggregator)
    try:
        if drainer is not None:
            drainer.start()
        if bound is not None:
            dashboard = _start_dashboard(bound)
        deadline = time.monotonic() + args.duration if args.duration else None
        next_export = time.monotonic() + EXPORT_EVERY_S
        tree = TreeCheck(topology)
        follower = follow.Follower(
            topology, pidfile=args.pidfile, grace_s=args.grace, ports=only,
            on_new_processes=probes.track, on_new_ports=probes.watch_ports,
            say=lambda line: print(f"accept-watch: {line}", file=sys.stderr))
        while not stop.is_set():
            tick_end = time.monotonic() + args.interval
            if deadline is not None:
                tick_end = min(tick_end, deadline)
            _wait(stop, tick_end)
            if drainer is not None:
                drainer.check()
            now = time.monotonic()
            snapshot = probes.snapshot()
            backstop.check(now)
            aggregator.backstop = backstop.to_doc()
            if tree.due(now, snapshot):
                follower.topology = _refresh(probes, follower.topology, only)
                tree.scanned(now, follower.topology, snapshot)
            depths = _depths(follower.topology)
            if depths is None or follower.waiting():
                # The master is gone: follow whoever carries on serving (or wait for a successor).
                alive_before = follower.topology
                if not follower.master_gone(now):
                    aggregator.update(_only_ports(snapshot, only), alive_before, {},
                                      **_evidence(snapshot, alive_before, wait_modes))
                    break
                if follower.topology is not alive_before:
                    wait_modes.maybe_sample(follower.topology, force=True)
                    tree.scanned(now, follower.topology, snapshot)
                depths = _depths(follower.topology)
            topology = follower.topology
            aggregator.update(_only_ports(snapshot, only), topology, depths or {},
                              **_evidence(snapshot, topology, wait_modes))
            wait_modes.maybe_sample(topology)
            blocked.maybe_sample(snapshot, aggregator)
            doc = publish()
            if not args.quiet:
                screen.show(doc)
            if sink is not None and now >= next_export:
                sink.periodic(doc)  # a failure is reported and retried, never fatal
                next_export = now + EXPORT_EVERY_S
            if deadline is not None and now >= deadline:
                break
        # Final read after the loop so nothing counted in the last interval is lost.
        if drainer is not None:
            drainer.stop()
            drainer = None
        topology = follower.topology
        final = probes.snapshot()
        aggregator.update(_only_ports(final, only), topology, _depths(topology) or {},
                          **_evidence(final, topology, wait_modes))
        doc = publish(ended=True)
    except ProbeError:
        # The maps could not be read any more: keep what was measured up to the last good read.
        if sink is not None:
            sink.final(publish(ended=True))
        raise
    finally:
        if drainer is not None:  # left early (an error): stop the thread before the writer closes
            with contextlib.suppress(Exception):
                drainer.stop()
        if dashboard is not None:
            dashboard.stop()
        if writer is not None:
            writer.close()
    exported = sink.final(doc) if sink is not None else True
    print(terminal.render(doc, width=_width(), ansi=False))
    if sink is not None and exported:
        print(f"accept-watch: export written to {args.export}")
    return 0 if exported else 1


def _wait(stop: threading.Event, until: float) -> None:
    while not stop.is_set():
        left = until - time.monotonic()
        if left <= 0:
            return
        stop.wait(min(left, 0.1))


def _inodes(topology: discovery.Topology) -> list[int]:
    return [lst.inode for lst in topology.listeners]


def _depths(topology: discovery.Topology) -> dict[int, int] | None:
    """Current accept-queue lengths; None once the master is gone."""
    try:
        return discovery.read_listen_depths(topology.master_pid, _inodes(topology))
    except discovery.DiscoveryError:
        return None


class TreeCheck:
    """When to re-scan the master's process tree: every REFRESH_EVERY_S, and sooner (checked every
    CHECK_EVERY_S) when a known process is gone or a process never seen has accepted (the kernel
    follows forks itself, so counts never wait for a scan; names and liveness in the views do)."""

    def __init__(self, topology: discovery.Topology) -> None:
        self._alive: set[int] = set(topology.processes)  # alive at the last scan
        self._known: set[int] = set(self._alive)  # and every worker the kernel had counted by then
        self._next_scan = time.monotonic() + REFRESH_EVERY_S
        self._next_check = time.monotonic() + CHECK_EVERY_S

    def due(self, now: float, snapshot: KernelSnapshot) -> bool:
        if now >= self._next_scan:
            return True
        if now < self._next_check:
            return False
        self._next_check = now + CHECK_EVERY_S
        if any(w.pid not in self._known for w in snapshot.workers):
            return True
        return any(not os.path.exists(f"/proc/{pid}") for pid in self._alive)

    def scanned(self, now: float, topology: discovery.Topology, snapshot: KernelSnapshot) -> None:
        # Workers that exited stay in the kernel's counters: known, so they do not trigger scans.
        self._alive = set(topology.processes)
        self._known = self._alive | {w.pid for w in snapshot.workers}
        self._next_scan = now + REFRESH_EVERY_S
        self._next_check = now + CHECK_EVERY_S


class WaitModes:
    """How each worker waits for connections (blocking accept, epoll, ...), sampled from /proc every
    WAIT_MODE_EVERY_S (it changes only when the server's code does, and sampling costs ~80 ms), and
    at once for processes not sampled yet (a respawned worker is a worker from its first wait)."""

    def __init__(self, topology: discovery.Topology) -> None:
        self._raw: dict[int, waitmode.WaitMode] = {}
        self._ppid: dict[int, int] = {}
        self._next = 0.0
        self.maybe_sample(topology)

    def maybe_sample(self, topology: discovery.Topology, force: bool = False) -> None:
        now = time.monotonic()
        due = force or now >= self._next
        pids = list(topology.processes) if due else [p for p in topology.processes if p not in self._raw]
        if not pids:
            return
        if due:
            self._next = now + WAIT_MODE_EVERY_S
        self._ppid.update({p: info.ppid for p, info in topology.processes.items()})
        for pid, wm in waitmode.detect_wait_modes(pids, set(_inodes(topology))).items():
            old = self._raw.get(pid)
            # A sample taken while a worker is busy may see no wait at all: keep what an earlier
            # sample established; a wait proven on the listener is kept for good.
            proven_before = old is not None and old.evidence == "listener"
            if old is None or wm.evidence == "listener" or (wm.mode != "unknown" and not proven_before):
                self._raw[pid] = wm
        for pid in [p for p in self._raw if p not in topology.processes][: max(0, len(self._raw) - 4096)]:
            del self._raw[pid]  # bounded: exited processes are forgotten first
            self._ppid.pop(pid, None)

    def current(self) -> dict[int, waitmode.WaitMode]:
        return waitmode.resolve_accept_mutex(self._raw, self._ppid)


def _evidence(snapshot: KernelSnapshot, topology: discovery.Topology,
              wait_modes: WaitModes) -> dict[str, Any]:
    """Roles (daemon/roles.py) and liveness for one update of the aggregator."""
    accepted = {w.pid for w in snapshot.workers if w.accepts > 0}
    ppids = {p: info.ppid for p, info in topology.processes.items()}
    roles = assign_roles(ppids, topology.holders, topology.master_pid, accepted, wait_modes.current())
    candidates = set(topology.processes) | accepted
    alive = {p for p in candidates if discovery.pid_alive(p)}
    return {"roles": roles, "alive": alive}


class BlockedSampler:
    """While a worker holds two or more accepted connections, looks (at most every BLOCKED_EVERY_S)
    whether it is blocked in its handler meanwhile (daemon/blocked.py)."""

    def __init__(self) -> None:
        self._next = 0.0

    def maybe_sample(self, snapshot: KernelSnapshot, aggregator: Aggregator) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        holding: dict[int, int] = {}
        for w in snapshot.workers:
            holding[w.pid] = holding.get(w.pid, 0) + w.inflight
        busy = {pid for pid, n in holding.items() if n >= 2}
        if not busy:
            return
        self._next = now + BLOCKED_EVERY_S
        found = blocked_workers(busy)
        if found:
            aggregator.note_blocked({pid: holding[pid] for pid in found})


def _refresh(probes: AcceptProbes, topology: discovery.Topology, only: set[int] | None) -> discovery.Topology:
    """Pick up respawned workers and new listeners. The kernel already follows forks; this catches
    processes adopted in other ways and keeps names and liveness for the views."""
    watch_new_ports = only is None
    try:
        fresh = follow.only_ports(discovery.refresh(topology), only)
    except discovery.DiscoveryError:
        return topology  # master gone: keep the last view; its workers show as exited
    new_pids = set(fresh.processes) - set(topology.processes)
    if new_pids:
        probes.track(new_pids)
    new_ports = {lst.port for lst in fresh.listeners} - {lst.port for lst in topology.listeners}
    if new_ports and watch_new_ports:
        probes.watch_ports(new_ports)
    return fresh


def _bind_dashboard(args: argparse.Namespace, published: PublishedDocument) -> DashboardServer:
    from accept_watch.dashboard.server import DashboardError, DashboardServer

    host, port = args.listen
    try:
        server = DashboardServer(published, listen_host=host, port=port, token=args.token)
        server.bind()
    except (DashboardError, ValueError) as exc:
        raise WatchError(f"cannot serve the dashboard on {host}:{port}: {exc}") from exc
    return server


def _start_dashboard(server: DashboardServer) -> DashboardServer:
    from accept_watch.dashboard.server import DashboardError

    try:
        server.start()
    except DashboardError as exc:
        raise WatchError(f"cannot serve the dashboard: {exc}") from exc
    print(f"accept-watch: dashboard at {server.url}", file=sys.stderr)
    return server


def _export_sink(args: argparse.Namespace, aggregator: Aggregator) -> ExportSink | None:
    if not args.export:
        return None

    def on_change(errors: dict[str, Any]) -> None:
        aggregator.export_errors = errors  # shown by the dashboard and /metrics from the next update

    return ExportSink(args.export, on_change)


def _width() -> int:
    return shutil.get_terminal_size((100, 40)).columns


class _Screen:
    """The live view: the table redrawn on a terminal, one summary line every 5 s in a pipe or log."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self._last_plain = 0.0

    def show(self, doc: dict[str, Any]) -> None:
        from . import terminal

        if self.tty:
            sys.stdout.write("\x1b[H\x1b[2J" + terminal.render(doc, width=_width(), ansi=True) + "\n")
            sys.stdout.flush()
            return
        now = time.monotonic()
        if now - self._last_plain >= 5:
            self._last_plain = now
            with contextlib.suppress(BrokenPipeError):
                print(terminal.summary_line(doc), flush=True)


def _only_ports(snapshot: KernelSnapshot, ports: set[int] | None) -> KernelSnapshot:
    """Keep the listening ports the user asked for (--port); the kernel counts them all."""
    if not ports:
        return snapshot
    return snapshot.restricted(lambda _pid, port: port in ports, lambda lst: lst.port in ports)
