"""Pydantic models of the accept-watch/1 document, used to document the HTTP API (OpenAPI).

The dashboard never validates what the daemon hands it on the hot path: these models describe the
contract (tests validate documents against them, and schemathesis checks responses against the
generated schema). Every model allows extra keys so the daemon can add fields without breaking clients.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_ID = "accept-watch/1"


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class QueueDepth(_Open):
    # Null until the listener has accepted once (the kernel reports them at accept time).
    current: int | None = Field(description="listener accept-queue length after the latest accept")
    max: int | None = Field(description="highest accept-queue length seen since attach")
    limit: int | None = Field(description="the listener's backlog limit (sk_max_ack_backlog); null until "
                              "the first accept")


class Listener(_Open):
    address: str | None = Field(description="null for a listener seen only by the kernel")
    port: int
    family: Literal["ipv4", "ipv6"] | None = Field(description="null for a listener seen only by the kernel")
    inode: int
    mode: Literal["shared", "reuseport", "single", "unknown"] = Field(
        description="'unknown': the kernel counted accepts on it, but it was opened and closed between "
        "two scans of the server's sockets")
    pids: list[int] = Field(description="processes holding this listening socket")
    accepts: int
    queue_depth: QueueDepth
    depth_history: list[tuple[float, int]] = Field(description="[seconds since start, depth], last 300")
    drops: int | None = Field(None, description="the socket's sk_drops: SYNs and handshakes dropped on a "
                              "full queue; null where the kernel did not report it")


class Rates(_Open):
    r1s: float = Field(alias="1s", description="accepts/s over the last second")
    r10s: float = Field(alias="10s", description="accepts/s over the last 10 s")
    r60s: float = Field(alias="60s", description="accepts/s over the last 60 s")


class QueueWait(_Open):
    """Time between the handshake completing and accept() returning, in microseconds."""

    p50: float | None
    p99: float | None
    max: float | None
    mean: float | None
    count: int


class Lifetime(_Open):
    mean: float | None
    max: float | None


class InFlight(_Open):
    now: int = Field(ge=0, description="accepted and not yet closed by the worker")
    max: int = Field(ge=0)
    busy_accepts: int = Field(ge=0, description="accepts made while already holding an open connection")
    closed: int = Field(ge=0)
    blocked_samples: int = Field(default=0, ge=0, description="samples that caught the worker blocked in "
                                 "its handler while holding two or more connections")
    blocked_max: int = Field(default=0, ge=0, description="most connections held at such a sample")
    life_ms: Lifetime = Field(description="accept -> close, in milliseconds")


class Container(_Open):
    """The container a process runs in, from its cgroup (daemon/procident.py)."""

    id: str = Field(pattern=r"^[0-9a-f]{12,64}$", description="the container id its runtime gave it")
    runtime: Literal["podman", "docker", "containerd", "cri-o", "kubernetes"] = Field(
        description="who named the cgroup ('kubernetes': a kubelet's cgroupfs pod path, runtime unnamed)")
    cgroup: str = Field(max_length=256, description="the cgroup path (sanitized: [A-Za-z0-9_.:@=+,/-], "
                        "other characters as '?'; a longer path keeps its tail after '...')")
    pod: str | None = Field(default=None, description="the Kubernetes pod uid, when the path names one")


class Worker(_Open):
    pid: int = Field(description="the host's pid (accept-watch's pid namespace)")
    nspid: int | None = Field(default=None, description="its pid inside its own pid namespace (a "
                              "container's), from NSpid; absent when the same as pid")
    container: Container | None = Field(default=None, description="absent when not in a container")
    ppid: int | None
    cmdline: str
    role: Literal["worker", "master", "helper"] = Field(
        description="from evidence: 'worker' accepted or was seen waiting on a listener; 'master' the "
        "watched process (or its successor) or a listener holder whose children are workers; "
        "'helper' the rest"
    )
    accepts: int
    share: float = Field(ge=0, le=1, description="accepts / total_accepts (0 when total is 0)")
    alive: bool
    first_seen: str | None
    last_seen: str | None
    rate: Rates
    queue_wait_us: QueueWait
    queue_wait_hist: list[tuple[int, int, int]] = Field(
        description="[low_ns, high_ns, count] for non-empty buckets of the log-linear histogram"
    )
    inflight: InFlight | None = None


class Transition(_Open):
    port: int
    from_: int = Field(alias="from", description="pid whose accept came before")
    to: int = Field(description="pid whose accept followed")
    count: int


class Backstop(_Open):
    state: Literal["not used", "attached", "retired", "kept"] = Field(
        description="the accept syscall-exit tracepoints next to fexit/kretprobe: 'not used' when they "
        "are the primary hook; 'retired' once every accept() in progress at attach had returned"
    )
    pending_at_attach: int = Field(description="threads that were inside accept() when the hook was attached")
    retired_after_s: float | None
    reason: str | None = Field(default=None, description="why it is kept, when it is")


class LiveWorkers(_Open):
    min: int | None
    max: int | None
    mean: float | None = Field(description="time-weighted")


class PortShares(_Open):
    """Per port: what each worker was owed while live and what it got (pid 0: exited workers folded)."""

    expected: dict[str, float]
    observed: dict[str, int]
    live_workers: LiveWorkers
    spans: dict[str, tuple[float, float]] = Field(
        description="pid -> [first, last] accept on this port, seconds since the start")


class Master(_Open):
    pid: int
    cmdline: str
    first_seen: str
    exited_at: str | None
    alive: bool
    watched: bool = Field(description="accept-watch followed it as the server's master")


class ExportErrors(_Open):
    count: int = Field(ge=0, description="failed writes of the --export file so far (each retried)")
    last_error: str | None
    last_at: str | None


class StreamedSnapshot(_Open):
    """The document as pushed on /api/stream: everything but `transitions` (the page does not use them)."""

    schema_: Literal["accept-watch/1"] = Field(alias="schema")
    tool_version: str
    master_pid: int
    master_cmdline: str
    probe: Literal["tracepoint", "kretprobe", "fexit"]
    probe_detail: str
    backstop: Backstop | None = Field(default=None, description="null until the probes are attached")
    export_errors: ExportErrors | None = Field(default=None, description="null until an --export write fails")
    kernel: str
    started_at: str
    updated_at: str
    ended_at: str | None
    duration_s: float
    total_accepts: int = Field(description="sum of worker accepts")
    lost_events: int = Field(description="per-connection stream records lost; counters stay exact")
    unattributed: int = Field(description="accepts that could not be counted at all (0 when exact)")
    diagnostics: dict[str, int]
    listeners: list[Listener]
    workers: list[Worker]
    rate_history: list[tuple[float, dict[str, int]]] = Field(
        description="[seconds since start, {pid: accepts in that second}], last 300 s"
    )
    fair_share: dict[str, PortShares] = Field(default_factory=dict, description="per port")
    masters: list[Master] = Field(default_factory=list, description="every master seen, in order")
    analysis: dict[str, Any]


class Snapshot(StreamedSnapshot):
    """The accept-watch/1 document (export, /api/snapshot)."""

    transitions: list[Transition] = Field(description="which worker's accept followed which, per port")


class Health(BaseModel):
    status: Literal["ok"]


class ErrorDetail(BaseModel):
    detail: str
