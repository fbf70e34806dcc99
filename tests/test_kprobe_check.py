"""probes.environment.kprobes_missing: the kretprobe attempt is skipped only where it is certain to
fail (pure logic on fake files)."""

from __future__ import annotations

from pathlib import Path

from accept_watch.probes.environment import kprobes_missing


def test_kprobes_missing_only_when_certain(tmp_path: Path) -> None:
    """The kretprobe attempt is skipped only where BCC cannot create a kprobe: no kprobe PMU and no
    kprobe_events, with tracefs mounted (unmounted tracefs proves nothing: try as before)."""
    pmu = tmp_path / "devices" / "kprobe" / "type"
    events = (tmp_path / "tracing" / "kprobe_events", tmp_path / "debug" / "tracing" / "kprobe_events")
    tracefs = (tmp_path / "tracing" / "events", tmp_path / "debug" / "tracing" / "events")
    assert kprobes_missing(pmu, events, tracefs) is None  # tracefs not mounted
    tracefs[0].mkdir(parents=True)
    reason = kprobes_missing(pmu, events, tracefs)
    assert reason is not None and "no kprobes" in reason
    events[1].parent.mkdir(parents=True)
    events[1].write_text("")
    assert kprobes_missing(pmu, events, tracefs) is None  # kprobe_events in the debugfs mount
    events[1].unlink()
    pmu.parent.mkdir(parents=True)
    pmu.write_text("6\n")
    assert kprobes_missing(pmu, events, tracefs) is None  # the perf kprobe PMU
