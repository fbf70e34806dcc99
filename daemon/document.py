"""The accept-watch/1 document as a typed model: the one definition of what the aggregator produces,
the export holds, `report` reads and the dashboard's OpenAPI schema publishes.

Data flows maps -> KernelSnapshot -> Aggregator (daemon/stats.py) -> Document -> analyze() -> views.
Views and other code that read plain dicts get `Document.to_dict()`: exactly the JSON object (the keys
that were given, in the model's order, extra keys kept), so dict readers and the model never disagree.

Every field type says in words what it must be (`Says`): a document that does not validate gets one
line naming the key, e.g. "workers[1].share must be a number in [0, 1], got 1.5" (DocumentError).
Models allow extra keys (a newer daemon may add fields; older readers keep them). Fields that older
exports may lack have defaults; `to_dict()` leaves out what was not given rather than inventing it.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, Strict, ValidationError

SCHEMA_ID = "accept-watch/1"


class Says:
    """What a value must be, in words, for one-line validation errors."""

    def __init__(self, phrase: str) -> None:
        self.phrase = phrase


class DocumentError(ValueError):
    """One line naming the key that does not fit the accept-watch/1 model."""


Count = Annotated[int, Strict(), Field(ge=0), Says("a non-negative integer")]
Pid = Annotated[int, Strict(), Field(ge=1), Says("a process id")]
PidOrZero = Annotated[int, Strict(), Field(ge=0), Says("a process id or 0")]
Port = Annotated[int, Strict(), Field(ge=0, le=65535), Says("a TCP port")]
Int = Annotated[int, Strict(), Says("an integer")]
Num = Annotated[float, Strict(), Field(allow_inf_nan=False), Says("a number")]
NonNeg = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False), Says("a non-negative number")]
Share = Annotated[float, Strict(), Field(ge=0, le=1, allow_inf_nan=False), Says("a number in [0, 1]")]
Text = Annotated[str, Strict(), Says("a string")]
Bool = Annotated[bool, Strict(), Says("true or false")]


def _bucket(b: tuple[int, int, int]) -> tuple[int, int, int]:
    if b[0] >= b[1]:
        raise ValueError("low >= high")
    return b


HistBucket = Annotated[tuple[Count, Count, Count], AfterValidator(_bucket), Says("[low_ns, high_ns, count]")]
DepthPoint = Annotated[tuple[Num, Count], Says("[seconds, depth]")]
RatePoint = Annotated[tuple[Num, dict[str, Count]], Says("[seconds, {pid: count}]")]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class QueueDepth(_Open):
    # Null until known: the kernel reports the limit at accept time; the current length is sampled.
    current: Count | None = Field(description="accept-queue length at the latest sample (null: unknown)")
    max: Count | None = Field(description="highest accept-queue length seen since attach")
    limit: Count | None = Field(description="the listener's backlog limit (sk_max_ack_backlog); null until "
                                "an accept on its port")


class Listener(_Open):
    address: Text | None = Field(description="null for a listener seen only by the kernel")
    port: Port
    family: Literal["ipv4", "ipv6"] | None = Field(None, description="null for a listener seen only by "
                                                   "the kernel")
    inode: Count = 0
    mode: Literal["shared", "reuseport", "single", "unknown"] = Field(
        description="'unknown': the kernel counted accepts on it, but it was opened and closed between "
        "two scans of the server's sockets")
    pids: list[Int] = Field(description="processes holding this listening socket")
    open: Bool = True
    accepts: Count
    queue_depth: QueueDepth
    drops: Count | None = Field(None, description="the socket's sk_drops: SYNs and handshakes dropped on a "
                                "full queue; null where the kernel did not report it")
    depth_history: list[DepthPoint] = Field(default_factory=list,
                                            description="[seconds since start, depth], last 300")


class Rates(_Open):
    r1s: NonNeg = Field(alias="1s", description="accepts/s over the last second")
    r10s: NonNeg = Field(alias="10s", description="accepts/s over the last 10 s")
    r60s: NonNeg = Field(alias="60s", description="accepts/s over the last 60 s")


class QueueWait(_Open):
    """Time between the handshake completing and accept() returning, in microseconds."""

    p50: NonNeg | None = None
    p99: NonNeg | None = None
    max: NonNeg | None = None
    mean: NonNeg | None = None
    count: Count = 0


class Lifetime(_Open):
    mean: Num | None = None
    max: Num | None = None


class InFlight(_Open):
    now: Count = Field(description="accepted and not yet closed by the worker")
    max: Count
    busy_accepts: Count = Field(description="accepts made while already holding an open connection")
    closed: Count
    blocked_samples: Count = Field(default=0, description="samples that caught the worker blocked in "
                                   "its handler while holding two or more connections")
    blocked_max: Count = Field(default=0, description="most connections held at such a sample")
    life_ms: Lifetime | None = Field(None, description="accept -> close, in milliseconds")


class Container(_Open):
    """The container a process runs in, from its cgroup (daemon/procident.py)."""

    id: str = Field(pattern=r"^[0-9a-f]{12,64}$", description="the container id its runtime gave it")
    runtime: Literal["podman", "docker", "containerd", "cri-o", "kubernetes"] = Field(
        description="who named the cgroup ('kubernetes': a kubelet's cgroupfs pod path, runtime unnamed)")
    cgroup: str = Field(max_length=256, description="the cgroup path (sanitized: [A-Za-z0-9_.:@=+,/-], "
                        "other characters as '?'; a longer path keeps its tail after '...')")
    pod: str | None = Field(default=None, description="the Kubernetes pod uid, when the path names one")


class Worker(_Open):
    """One process of the server (extra keys, e.g. container fields, are kept)."""

    pid: Pid
    ppid: Int | None = None
    cmdline: Text = ""
    role: Literal["worker", "master", "helper"] = Field(
        "worker",
        description="from evidence: 'worker' accepted or was seen waiting on a listener; 'master' the "
        "watched process (or its successor) or a listener holder whose children are workers; "
        "'helper' the rest")
    accepts: Count
    share: Share = Field(description="accepts / total_accepts (0 when total is 0)")
    alive: Bool = True
    first_seen: Text | None = None
    last_seen: Text | None = None
    rate: Rates | None = None
    queue_wait_us: QueueWait | None = Field(None, description="null: no wait measured")
    inflight: InFlight | None = None
    queue_wait_hist: list[HistBucket] = Field(
        default_factory=list,
        description="[low_ns, high_ns, count] for non-empty buckets of the log-linear histogram")
    nspid: Int | None = Field(None, description="its pid inside its own pid namespace (a container's), "
                              "from NSpid; absent when the same as pid")
    container: Container | None = Field(None, description="absent when not in a container")


class Transition(_Open):
    port: Port
    from_: PidOrZero = Field(alias="from", description="pid whose accept came before (0: none yet)")
    to: Pid = Field(description="pid whose accept followed")
    count: Count


class Backstop(_Open):
    state: Literal["not used", "attached", "retired", "kept"] = Field(
        description="the accept syscall-exit tracepoints next to fexit/kretprobe: 'not used' when they "
        "are the primary hook; 'retired' once every accept() in progress at attach had returned")
    pending_at_attach: Count = Field(description="threads inside accept() when the hook was attached")
    retired_after_s: Num | None = None
    reason: Text | None = Field(default=None, description="why it is kept, when it is")


class LiveWorkers(_Open):
    min: Count | None = None
    max: Count | None = None
    mean: Num | None = Field(None, description="time-weighted")


class PortShares(_Open):
    """Per port: what each worker was owed while live and what it got (pid 0: exited workers folded)."""

    expected: dict[str, NonNeg] = Field(default_factory=dict)
    observed: dict[str, Count] = Field(default_factory=dict)
    live_workers: LiveWorkers | None = None
    spans: dict[str, tuple[Num, Num]] = Field(
        default_factory=dict, description="pid -> [first, last] accept on this port, seconds since the start")
    accept_spans: dict[str, tuple[Num, Num]] = Field(
        default_factory=dict, description="the same spans on the port's accept clock (how many accepts the "
        "port had made by then): what the same-worker baseline weighs, so idle time weighs nothing")


class Master(_Open):
    pid: Pid
    cmdline: Text
    first_seen: Text
    exited_at: Text | None
    alive: Bool
    watched: Bool = Field(description="accept-watch followed it as the server's master")


class ExportErrors(_Open):
    count: Count = Field(description="failed writes of the --export file so far (each retried)")
    last_error: Text | None = None
    last_at: Text | None = None


class EvictedWait(_Open):
    hist: list[HistBucket] = Field(default_factory=list)
    count: Count = 0
    sum_us: NonNeg = 0.0


class Verdict(_Open):
    # Optional: an export's stored verdict is only compared with the one `report` recomputes.
    pattern: Text | None = Field(None, description="round-robin, concentrated, random, even, "
                                 "single-acceptor, not enough data")
    confidence: Text | None = Field(None, description="high, medium, low")
    sentence: Text | None = None
    cause: Text | None = Field(None, description="the mechanism named (daemon/explain.py), or 'unknown'")
    evidence: Text | None = Field(None, description="what the cause rests on")
    figures: dict[str, Any] = Field(default_factory=dict)
    port: Int | None = None


class Flag(_Open):
    code: Text
    message: Text


class WaitModes(_Open):
    by_pid: dict[str, dict[str, Any]] = Field(default_factory=dict)
    counts: dict[str, Count] = Field(default_factory=dict)
    dominant: Text | None = None


class Competitors(_Open):
    """The processes the accepts are shared by now: the one rule every view uses for the fair share."""

    pids: list[Int] = Field(description="live workers (and any process that accepted); every worker once "
                            "none is alive")
    fair_share: Share | None = Field(description="1 / len(pids); null without competitors")


class Analysis(_Open):
    """The "why" (daemon/analysis.py); empty until analyzed, {"error": ...} when the analysis failed."""

    fairness: dict[str, Any] | None = None
    per_port: dict[str, dict[str, Any]] | None = None
    verdict: Verdict | None = None
    wait_modes: WaitModes | None = None
    flags: list[Flag] | None = None
    competitors: Competitors | None = None
    error: Text | None = None


class StreamedSnapshot(_Open):
    """The document as pushed on /api/stream: everything but `transitions` (the page does not use them)."""

    schema_: Literal["accept-watch/1"] = Field(alias="schema")
    tool_version: Text | None = None
    master_pid: Pid
    master_cmdline: Text | None = None
    probe: Text = Field(description="tracepoint, kretprobe or fexit")
    probe_detail: Text | None = None
    backstop: Backstop | None = Field(default=None, description="null until the probes are attached")
    export_errors: ExportErrors | None = Field(default=None, description="null until an --export write fails")
    kernel: Text | None = None
    started_at: Text | None = None
    updated_at: Text | None = None
    ended_at: Text | None = None
    duration_s: NonNeg
    total_accepts: Count = Field(description="sum of worker accepts")
    lost_events: Count = Field(description="per-connection stream records lost; counters stay exact")
    unattributed: Count = Field(description="accepts that could not be counted at all (0 when exact)")
    diagnostics: dict[str, Count] = Field(default_factory=dict)
    evicted_queue_wait: EvictedWait | None = Field(None, description="queue waits of evicted workers")
    listeners: list[Listener]
    workers: list[Worker]
    rate_history: list[RatePoint] = Field(
        default_factory=list, description="[seconds since start, {pid: accepts in that second}], last 300 s")
    fair_share: dict[str, PortShares] = Field(default_factory=dict, description="per port")
    masters: list[Master] = Field(default_factory=list, description="every master seen, in order")
    analysis: Analysis = Field(default_factory=Analysis)
    _dict: dict[str, Any] | None = PrivateAttr(None)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: what was given (no invented defaults), aliases as keys, extras kept.
        Built once per document (a document is not changed after it is built): treat it as read-only."""
        if self._dict is None:
            self._dict = self.model_dump(mode="json", by_alias=True, exclude_unset=True)
        return self._dict

    def with_analysis(self, analysis: dict[str, Any] | Analysis) -> Self:
        """A copy with this analysis section (validated)."""
        section = analysis if isinstance(analysis, Analysis) else Analysis.model_validate(analysis)
        out = self.model_copy(update={"analysis": section})
        # The rest is unchanged: its JSON form is reused (the key keeps its place), not dumped again.
        out._dict = None if self._dict is None else {
            **self._dict, "analysis": section.model_dump(mode="json", by_alias=True, exclude_unset=True)}
        return out

    @classmethod
    def of_json_dict(cls, raw: dict[str, Any]) -> Self:
        """Validate a dict that is already the document's JSON form (the aggregator's build): the model,
        with `raw` kept as its to_dict() rather than dumped again (for a large server the dump costs
        as much as the build). Raises pydantic's ValidationError: a bad build is a bug, not input."""
        doc = cls.model_validate(raw)
        doc._dict = raw
        return doc


class Snapshot(StreamedSnapshot):
    """The accept-watch/1 document (export, /api/snapshot, `report`'s input). Named as the HTTP API
    has always named it (its OpenAPI component); `Document` is the same class."""

    transitions: list[Transition] = Field(description="which worker's accept followed which, per port")

    @classmethod
    def from_dict(cls, raw: Any) -> Snapshot:
        """Validate a parsed JSON value; DocumentError (one line naming the key) when it does not fit."""
        if not isinstance(raw, dict):
            raise DocumentError(f"not an accept-watch export (a JSON object is expected, got "
                                f"{type(raw).__name__})")
        if "schema" not in raw:
            raise DocumentError(f"no 'schema' key: not an accept-watch export (expected {SCHEMA_ID!r})")
        if raw["schema"] != SCHEMA_ID:
            raise DocumentError(f"schema {raw['schema']!r:.80} is not {SCHEMA_ID!r}")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise DocumentError(_one_line(cls, exc)) from None


# ---------------------------------------------------------------------------------------------------
# One-line errors
# ---------------------------------------------------------------------------------------------------


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unwrap(tp: Any) -> tuple[Any, str | None]:
    """(the type inside Annotated/Optional, the innermost phrase found)."""
    phrase = None
    while True:
        if typing.get_origin(tp) is Annotated:
            for meta in tp.__metadata__:
                if isinstance(meta, Says):
                    phrase = meta.phrase
            tp = tp.__origin__
            continue
        args = typing.get_args(tp)
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
            rest = [a for a in args if a is not type(None)]
            if len(rest) == 1:
                tp = rest[0]
                continue
        return tp, phrase


def _phrase_at(model: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """What the value at `loc` must be, from the Says markers of the model's field types."""
    tp: Any = model
    phrase: str | None = None
    for part in loc:
        tp, found = _unwrap(tp)
        phrase = found or phrase
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = next((f for name, f in tp.model_fields.items() if part in (name, f.alias)), None)
            if field is None:
                return None
            says = [m.phrase for m in field.metadata if isinstance(m, Says)]
            tp, phrase = field.annotation, (says[-1] if says else None)
            continue
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is list and args:
            tp, phrase = args[0], None
        elif origin is dict and len(args) == 2:
            tp, phrase = args[1], None
        elif origin is tuple and isinstance(part, int) and part < len(args):
            tp, phrase = args[part], None
        else:
            return None
    tp, found = _unwrap(tp)
    return found or phrase


_KIND = {"model_type": "an object", "dict_type": "an object", "list_type": "a list",
         "tuple_type": "a list", "model_attributes_type": "an object"}


def _got(value: Any) -> str:
    text = repr(value)
    if isinstance(value, dict | list) and len(text) > 60:
        return type(value).__name__
    return f"{text:.60}"


def _one_line(model: type[BaseModel], exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    top_missing = [e["loc"][0] for e in errors if e["type"] == "missing" and len(e["loc"]) == 1]
    if top_missing:
        return f"missing key(s) {', '.join(str(k) for k in top_missing)}"
    e = errors[0]
    loc = tuple(e["loc"])
    if e["type"] == "missing":
        return f"{_path(loc[:-1])} has no {loc[-1]!r}"
    what = _KIND.get(e["type"]) or _phrase_at(model, loc)
    if e["type"] == "literal_error":
        what = f"one of {e['ctx']['expected']}"
    if what is None:
        return f"{_path(loc)}: {e['msg']}"
    return f"{_path(loc)} must be {what}, got {_got(e.get('input'))}"


Document = Snapshot
StreamedDocument = StreamedSnapshot
