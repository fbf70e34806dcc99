"""What the benchmark reads from /proc: CPU time and memory of a process, machine facts, TIME_WAIT,
and the CPU used by processes that are not part of the benchmark (other work on the VM skews it)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from accept_watch.probes.compilermem import COMPILER_LIBS

CLK_TCK = os.sysconf("SC_CLK_TCK")


class ProcGone(Exception):
    """The process exited while we were reading it."""


def _stat_fields(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcGone(f"pid {pid} is gone") from None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (all its threads) and of its children it has waited
    for (a helper command it runs, such as ss), in seconds."""
    f = _stat_fields(pid)
    # utime, stime, cutime, cstime (fields 14-17)
    return (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), RssAnon, RssFile, RssShmem of a process, in KiB."""
    wanted = {"VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"}
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in wanted:
                    out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        raise ProcGone(f"pid {pid} is gone") from None
    missing = wanted - set(out)
    if missing:
        raise ValueError(f"/proc/{pid}/status lacks {', '.join(sorted(missing))}")
    return out


def _smaps(pid: int) -> Iterator[tuple[str, str, int]]:
    """(mapped file or "[anon]", field, kB) for every size line of /proc/PID/smaps."""
    current = "[anon]"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                parts = line.split()
                if not parts:
                    continue
                if not parts[0].endswith(":"):  # a mapping header: range perms offset dev inode [path]
                    current = parts[5] if len(parts) > 5 else "[anon]"
                elif len(parts) > 1 and parts[1].isdigit():
                    yield current, parts[0], int(parts[1])
    except (FileNotFoundError, ProcessLookupError):
        raise ProcGone(f"pid {pid} is gone") from None


def rss_by_mapping(pid: int, top: int = 8) -> list[dict[str, object]]:
    """Where a process's RSS is: /proc/PID/smaps summed per mapped file ([heap], [anon], ...), in MB."""
    rss: dict[str, int] = {}
    anon: dict[str, int] = {}
    for mapping, key, kib in _smaps(pid):
        if key == "Rss:":
            rss[mapping] = rss.get(mapping, 0) + kib
        elif key == "Anonymous:":
            anon[mapping] = anon.get(mapping, 0) + kib
    ranked = sorted(rss.items(), key=lambda kv: -kv[1])[:top]
    return [
        {"mapping": k, "rss_mb": round(v / 1024, 1), "anon_mb": round(anon.get(k, 0) / 1024, 1)}
        for k, v in ranked
    ]


def compiler_memory(pid: int) -> dict[str, float]:
    """The compiler libraries (libLLVM, libclang) in a process, in MB: mapped, resident, and resident
    pages only this process maps (those accept-watch's MADV_PAGEOUT after compiling can give back)."""
    kib = {"mapped": 0, "rss": 0, "private": 0}
    fields = {"Size:": "mapped", "Rss:": "rss", "Private_Clean:": "private", "Private_Dirty:": "private"}
    for mapping, key, size in _smaps(pid):
        name = mapping.rsplit("/", 1)[-1]
        if key in fields and any(lib in name for lib in COMPILER_LIBS):
            kib[fields[key]] += size
    return {f"{k}_mb": round(v / 1024, 1) for k, v in kib.items()}


def loadavg() -> tuple[float, float, float]:
    with open("/proc/loadavg") as f:
        a, b, c = f.read().split()[:3]
    return float(a), float(b), float(c)


def time_wait_sockets() -> int:
    """TCP sockets in TIME_WAIT (all of the machine's network namespace), from /proc/net/sockstat."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()
                return int(parts[parts.index("tw") + 1])
    raise ValueError("/proc/net/sockstat has no TCP line")


def machine() -> dict[str, object]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
                break
    distro = "unknown"
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    distro = line.split("=", 1)[1].strip().strip('"')
    except FileNotFoundError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": os.uname().release,
        "os": distro,
    }


def _busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user/nice
    return total - idle, total


def busy_cores(seconds: float) -> float:
    """How many cores were busy, on average, over the next `seconds`."""
    b0, t0 = _busy_ticks()
    time.sleep(seconds)
    b1, t1 = _busy_ticks()
    ncpu = os.cpu_count() or 1
    return (b1 - b0) / max(1, t1 - t0) * ncpu


def _is_kernel_thread(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return True
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]) == 2 or pid == 2  # ppid kthreadd


@dataclass
class OthersSample:
    cpu: dict[int, float]  # pid -> cpu seconds, for user-space processes not ours
    at: float


def sample_others(ours: set[int]) -> OthersSample:
    """CPU time of every user-space process that is not part of the benchmark."""
    cpu: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid in ours or _is_kernel_thread(pid):
            continue
        try:
            cpu[pid] = cpu_seconds(pid)
        except ProcGone:
            continue
    return OthersSample(cpu, time.monotonic())


def others_cpu_pct(before: OthersSample, after: OthersSample) -> float:
    """CPU used by other user-space processes between two samples, in % of one core.

    A process that started and ended between the samples is not seen (a lower bound)."""
    used = 0.0
    for pid, cpu in after.cpu.items():
        # A pid first seen in `after` started in between: all its CPU time is inside the window.
        used += cpu - before.cpu[pid] if pid in before.cpu else cpu
    wall = max(1e-6, after.at - before.at)
    return round(100.0 * max(0.0, used) / wall, 1)
