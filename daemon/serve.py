"""`accept-watch serve`: a host daemon watching many servers at once with one set of BPF programs.

One AcceptProbes: its tracked-process map holds every target's processes (the kernel adds their
children itself), its watched ports the union of their ports. Each read of the counters is split by
pid ownership (daemon/targets.py) into one aggregator per target. Targets come and go without a
restart: a target with no process is "down" and looked for again every --resolve-every seconds;
--all looks for new shared listening sockets at the same pace. Exited workers are folded into their
target's pid="exited" figures --retention seconds after they exit, and their kernel entries deleted,
so memory and metric series stay bounded over weeks of --max-requests respawns.

Logging: one line per event on stderr ("accept-watch serve: ..."), no terminal UI, no colour (journald
takes stderr as it is). SIGTERM/SIGINT: final read, final exports, detach, exit 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from accept_watch.probes import environment
from accept_watch.probes.records import KernelSnapshot, ProbeKind

from . import discovery, export, resolve, sockdiag
from .backstop import Backstop
from .exportsink import ExportSink
from .listenerprune import ListenerPruner
from .safefile import ExportError
from .sanitize import clean
from .serveopts import ServeOptions, options_from_argv
from .targets import Kernel, Target, split
from .targetspec import SpecError

EXPORT_EVERY_S = 10.0
PRUNE_EVERY_S = 60.0


def say(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(f"accept-watch serve: {clean(line)}", file=sys.stderr, flush=True)


def _err(message: str) -> int:
    print(f"accept-watch serve: error: {clean(message)}", file=sys.stderr, flush=True)
    return 2


def run_serve(argv: list[str]) -> int:
    from accept_watch.probes.btf import BtfError
    from accept_watch.probes.kernel import ProbeError

    try:
        opts = options_from_argv(argv)
    except SpecError as exc:
        return _err(str(exc))
    try:
        return Serve(opts).run()
    except (SpecError, resolve.UnknownUnit, ExportError, environment.EnvironmentProblem, ProbeError, BtfError,
            discovery.DiscoveryError) as exc:
        print(f"accept-watch serve: error: {clean(str(exc))}", file=sys.stderr, flush=True)
        return 1


class Serve:
    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.owners: dict[int, Target] = {}
        self.kernel = Kernel(track=self._track, watch_ports=self._watch_ports, owners=self.owners, say=say,
                             retention_s=opts.retention)
        self.targets: list[Target] = []
        self.counters = {"pruned_workers": 0, "pruned_listeners": 0, "refused_targets": 0,
                         "unowned_workers": 0}
        self._listener_pruner = ListenerPruner(opts.retention)
        self._kernel_listeners: dict[int, int] = {}  # inode -> port, from the latest snapshot
        self._unowned: dict[int, None] = {}  # counted pids no target could be given (bounded)
        self._refused: dict[int, None] = {}  # --all masters over the target cap, said once
        self._probes: Any = None
        self._pending_track: set[int] = set()
        self._pending_ports: set[int] = set()
        self._lock = threading.RLock()
        self._sinks: dict[str, ExportSink] = {}

    # -- the kernel side, before and after attach -------------------------------------------------
    def _track(self, pids: Any) -> None:
        if self._probes is None:
            self._pending_track.update(pids)
        else:
            self._probes.track(pids)

    def _watch_ports(self, ports: Any) -> None:
        if self._probes is None:
            self._pending_ports.update(ports)
        else:
            self._probes.watch_ports(ports)

    # -- start -------------------------------------------------------------------------------------
    def _initial(self) -> None:
        for spec in self.opts.specs:
            if spec.kind == "unit":
                resolve.check_unit(spec)
            t = Target(spec, None, self.kernel)
            if spec.kind == "pid" and not discovery.pid_alive(int(spec.value)):
                raise SpecError(f"--pid {spec.value}: no such process")
            self.targets.append(t)
        for t in self.targets:
            if not t.resolve(self._owned_elsewhere(t)):
                if t.spec is not None and t.spec.kind == "pid":
                    raise SpecError(f"pid {t.spec.value}: no listening TCP socket in its process tree")
                say(f"target {t.label()}: down at start ({t.spec.describe() if t.spec else ''}); "
                    f"looked for every {self.opts.resolve_every:g} s")
        self._check_names()
        if self.opts.all:
            self._scan_all()

    def _owned_elsewhere(self, target: Target) -> Callable[[int], bool]:
        def owned(pid: int) -> bool:
            t = self.owners.get(pid)
            return t is not None and t is not target and t.up and pid in t.topology.processes  # type: ignore[union-attr]
        return owned

    def _check_names(self) -> None:
        seen: dict[str, Target] = {}
        for t in self.targets:
            if t.name is None:
                continue
            if t.name in seen and seen[t.name] is not t:
                raise SpecError(f"two targets are named {t.name!r}: name them (--KIND NAME=VALUE, "
                                "or name = ... in the file)")
            seen[t.name] = t

    def run(self) -> int:
        from accept_watch.probes.kernel import AcceptProbes
        from accept_watch.probes.offsets import load_layout

        environment.require_privileges()
        environment.require_btf()
        if self.opts.export_dir is not None:
            export.check_writable(self.opts.export_dir / "accept-watch-serve.json", "export")
        self._initial()
        environment.ensure_tracing_mounts()
        layout = load_layout(str(environment.BTF_PATH))
        stop = threading.Event()
        http = None if self.opts.dry_run else self._bind_http()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            probe = None if self.opts.probe == "auto" else ProbeKind(self.opts.probe)
            with AcceptProbes(layout, emit_events=False, inflight=not self.opts.no_inflight) as probes:
                result = probes.attach(probe, sorted(self._pending_track), sorted(self._pending_ports))
                self._probes = probes
                self._pending_track.clear()
                self._pending_ports.clear()
                self.kernel.probe, self.kernel.probe_detail = result.kind.value, result.detail
                for t in self.targets:
                    if t.aggregator is not None:
                        t.aggregator.set_probe(result.kind.value, result.detail)
                say(f"probe {result.kind} ({result.detail}); compiled in {result.compile_s:.2f} s, "
                    f"attached in {result.attach_s:.2f} s; {len(self.targets)} targets, "
                    f"{sum(t.up for t in self.targets)} up")
                if self.opts.dry_run:
                    print(f"accept-watch serve: dry run OK: probe {result.kind}, {len(self.targets)} targets")
                    return 0
                backstop = Backstop(probes, result.kind, list(self.owners), time.monotonic())
                if http is not None:
                    http.start()
                    say(f"serving /metrics and /api/targets at {http.url}")
                return self._loop(probes, backstop, stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if http is not None:
                http.close()

    def _bind_http(self) -> Any:
        from accept_watch.dashboard.serveapp import create_serve_app
        from accept_watch.dashboard.server import DashboardError, DashboardServer

        host, port = self.opts.listen
        try:
            server = DashboardServer(self, listen_host=host, port=port, token=self.opts.token,  # type: ignore[arg-type]
                                     app_factory=create_serve_app)
            server.bind()
        except (DashboardError, ValueError) as exc:
            raise SpecError(f"cannot serve on {host}:{port}: {exc}") from exc
        if server.token is not None and self.opts.token is None:
            say(f"token for non-loopback clients: {server.token}")
        return server

    # -- the loop ------------------------------------------------------------------------------------
    def _loop(self, probes: Any, backstop: Backstop, stop: threading.Event) -> int:
        now = time.monotonic()
        next_resolve = now + self.opts.resolve_every
        next_export = now + EXPORT_EVERY_S
        next_prune = now + min(PRUNE_EVERY_S, self.opts.retention)
        from accept_watch.probes.kernel import ProbeError

        try:
            while not stop.is_set():
                stop.wait(self.opts.interval)
                now = time.monotonic()
                snapshot = probes.snapshot()
                backstop.check(now)
                self._tick(snapshot, now, backstop.to_doc())
                if now >= next_resolve:
                    self._resolve_down()
                    self._assign_owners(snapshot, retry=True)
                    next_resolve = now + self.opts.resolve_every
                if now >= next_prune:
                    self._prune(probes)
                    next_prune = now + min(PRUNE_EVERY_S, self.opts.retention)
                if self.opts.export_dir is not None and now >= next_export:
                    self._export(final=False)
                    next_export = now + EXPORT_EVERY_S
            # Final read so nothing counted in the last interval is lost.
            self._tick(probes.snapshot(), time.monotonic(), backstop.to_doc())
        except ProbeError:
            # The maps cannot be read any more: keep what was measured up to the last good read.
            if self.opts.export_dir is not None:
                self._export(final=True)
            raise
        ok = self._export(final=True) if self.opts.export_dir is not None else True
        say(f"stopping: {sum(t.up for t in self.targets)} of {len(self.targets)} targets up; "
            f"{sum(self._total(t) for t in self.targets)} accepts counted")
        return 0 if ok else 1

    @staticmethod
    def _total(t: Target) -> int:
        return t.latest["total_accepts"] if t.latest is not None else 0

    def _tick(self, snapshot: KernelSnapshot, now: float, backstop_doc: Any) -> None:
        self._assign_owners(snapshot)
        self._kernel_listeners = {lst.inode: lst.port for lst in snapshot.listeners}
        depths = _listen_depths()
        own_netns = _netns(os.getpid())
        with self._lock:
            for t in list(self.targets):
                part = split(snapshot, t.pids, t.inodes)
                try:
                    t.tick(part, now, depths, own_netns)
                except discovery.DiscoveryError as exc:  # e.g. a process we may not read: keep going
                    t.note_once(f"target {t.label()}: {exc}")
                except Exception as exc:  # one target's failure must not stop the others: said, once
                    t.note_once(f"target {t.label()}: update skipped: {type(exc).__name__}: {exc}")
                if t.aggregator is not None:
                    t.aggregator.backstop = backstop_doc

    def _assign_owners(self, snapshot: KernelSnapshot, retry: bool = False) -> None:
        """Workers the kernel counted that no target owns yet (forked since the last scan): the target
        owning an ancestor, else the one target listening on the worker's port. One that no target can
        take is counted and said once, and tried again at each resolve period (retry)."""
        for w in snapshot.workers:
            if w.pid in self.owners or (w.pid in self._unowned and not retry):
                continue
            owner = self._by_ancestry(w.pid) or self._by_port(w.port)
            if owner is not None:
                owner.claim(w.pid)
                self._unowned.pop(w.pid, None)
            elif w.pid not in self._unowned and len(self._unowned) < 4096:
                self._unowned[w.pid] = None
                self.counters["unowned_workers"] += 1
                say(f"pid {w.pid} accepted on port {w.port} but belongs to no target; not counted")

    def _by_ancestry(self, pid: int) -> Target | None:
        for _ in range(64):
            ppid = resolve._ppid(pid)
            if ppid is None or ppid <= 1:
                return None
            owner = self.owners.get(ppid)
            if owner is not None:
                return owner
            pid = ppid
        return None

    def _by_port(self, port: int) -> Target | None:
        holders = [t for t in self.targets if t.up and port in t.topology.ports]  # type: ignore[union-attr]
        return holders[0] if len(holders) == 1 else None

    def _resolve_down(self) -> None:
        with self._lock:
            for t in self.targets:
                if not t.up:
                    t.resolve(self._owned_elsewhere(t))
            self._check_names_soft()
            if self.opts.all:
                self._scan_all()
            self._drop_gone_dynamic()

    def _check_names_soft(self) -> None:
        names = [t.name for t in self.targets if t.name]
        if len(names) != len(set(names)):
            say("warning: two targets have the same server name; name them in the config")

    def _scan_all(self) -> None:
        owned = {p: t for p, t in self.owners.items() if t.up and p in t.topology.processes}  # type: ignore[union-attr]
        for master in resolve.scan_all(owned):
            try:
                topo = discovery.discover(master)
            except discovery.DiscoveryError:
                continue
            from accept_watch.dashboard.metrics import server_name

            name = server_name({"master_cmdline": topo.master_cmdline,
                                "listeners": [{"port": p} for p in topo.ports]})
            existing = next((t for t in self.targets if t.name == name), None)
            if existing is not None and not existing.up:
                existing.adopt(master, "found by --all")  # the same server back: a new generation
                continue
            if existing is not None:
                name = f"{name}-{master}"[:64]  # a second server of the same command and port
            if len(self.targets) >= self.opts.max_targets:
                if master not in self._refused and len(self._refused) < 4096:  # said and counted once
                    self._refused[master] = None
                    self.counters["refused_targets"] += 1
                    say(f"not watching {name} (master {master}): {self.opts.max_targets} targets already")
                continue
            t = Target(None, name, self.kernel, dynamic=True)
            if t.adopt(master, "found by --all"):
                self.targets.append(t)

    def _drop_gone_dynamic(self) -> None:
        """--all targets down for longer than the retention time are forgotten (their series end)."""
        now = time.monotonic()
        for t in [t for t in self.targets if t.dynamic and not t.up and t.down_since is not None
                  and now - t.down_since > self.opts.retention]:
            say(f"target {t.name}: down for {self.opts.retention:g} s, no longer watched")
            if self._probes is not None:
                self._prune_pids(self._probes, set(t.pids))
            t.release(set(t.pids))
            self.targets.remove(t)

    def _prune(self, probes: Any) -> None:
        """Delete the kernel entries of workers folded away (retention passed) and no longer alive."""
        with self._lock:
            doomed: set[int] = set()
            for t in self.targets:
                if t.aggregator is not None:
                    doomed |= {p for p in t.aggregator.evicted_pids() if not discovery.pid_alive(p)}
            gone = {p for p in self._unowned if not discovery.pid_alive(p)}
            for p in gone:
                del self._unowned[p]
            self._prune_pids(probes, doomed | gone)
            up = [t.topology for t in self.targets if t.topology is not None]
            inodes, ports = self._listener_pruner.due(
                self._kernel_listeners, (i for topo in up for i in topo.inodes),
                (p for topo in up for p in topo.ports), time.monotonic())
            if inodes or ports:
                probes.forget_listeners(inodes, ports)
                self.counters["pruned_listeners"] += len(inodes)

    def _prune_pids(self, probes: Any, doomed: set[int]) -> None:
        if not doomed:
            return
        probes.forget_workers(doomed)
        for t in self.targets:
            if t.aggregator is not None:
                t.aggregator.forget_evicted(doomed)
            t.release(doomed & t.pids)
        self.counters["pruned_workers"] += len(doomed)

    def _export(self, final: bool) -> bool:
        assert self.opts.export_dir is not None
        ok = True
        for t in list(self.targets):
            if t.aggregator is None or t.name is None:
                continue
            sink = self._sinks.get(t.name)
            if sink is None:
                if len(self._sinks) >= self.opts.max_targets * 2:
                    continue
                sink = self._sinks[t.name] = ExportSink(self.opts.export_dir / f"{_file_name(t.name)}.json")
            doc = t.publish(ended=True) if final else t.latest
            if doc is None:
                continue
            ok = (sink.final(doc) if final else sink.periodic(doc)) and ok
        return ok

    # -- the HTTP source (dashboard/serveapp.py ServeSource) ----------------------------------------
    def target_list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [t.summary() for t in self.targets]

    def document(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            t = next((t for t in self.targets if t.name == name), None)
        return None if t is None else t.latest

    def metric_documents(self) -> list[tuple[str, bool, dict[str, Any] | None]]:
        with self._lock:
            targets = [t for t in self.targets if t.name is not None]
        return [(t.name, t.up, t.latest) for t in targets]  # type: ignore[misc]

    def daemon_counters(self) -> dict[str, float]:
        return {**self.counters, "kernel_listener_entries": len(self._kernel_listeners)}


def _file_name(name: str) -> str:
    """A target's export file name: its server name, ':' kept out (tools split paths on it)."""
    return name.replace(":", "_").lstrip(".") or "target"


def _netns(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _listen_depths() -> discovery.ListenDepths | None:
    """Every listening socket's queue length (and sk_drops) in our own network namespace: one dump."""
    try:
        found = sockdiag.listeners()
    except sockdiag.SockDiagError:
        return None
    return discovery.ListenDepths({lst.inode: lst.accept_queue for lst in found},
                                  {lst.inode: lst.drops for lst in found if lst.drops is not None})


