"""docs/install-check.md from the guests' results (run.py's JSON): what was run, and what came out."""

from __future__ import annotations

import datetime as dt


def _one_line(text: str, limit: int = 160) -> str:
    line = " ".join(str(text).split())
    return (line[: limit - 1] + "…" if len(line) > limit else line).replace("|", "\\|")


def _verdict(res: dict | None) -> str:
    if res is None:
        return "FAIL (no result)"
    return "FAIL" if res.get("problems") else "PASS"


def _last_error(journal: str) -> str:
    lines = [ln for ln in journal.splitlines() if "error" in ln.lower() or "Unable" in ln]
    return _one_line(lines[-1] if lines else journal.splitlines()[-1] if journal else "-")


def suite_row(run: dict) -> str:
    r, m = run["results"], run.get("manifest", {})
    count = r.get("count") or {}
    app_total = sum((count.get("app") or {}).values())
    shown = (f"{_verdict(count)} ({count.get('total_accepts')}/{count.get('n')}, app {app_total}, "
             f"{len(count.get('watch') or {})} workers, {count.get('probe')})" if count else _verdict(None))
    sysd = r.get("systemd")
    if sysd:
        base = sysd.get("shipped") or {}
        got = sum((base.get("metrics") or {}).values())
        sysd_text = (f"{_verdict(sysd)} (/metrics {got}/{sum((base.get('app') or {}).values())}; "
                     f"CapEff {' '.join(sysd.get('caps_names') or []) or '-'})")
    else:
        sysd_text = "not run"
    cells = [f"{m.get('suite', run['suite'])}: {r.get('boot', {}).get('os', '?')}", m.get("kernel", "?"),
             r.get("boot", {}).get("python", "?"), m.get("python3-bpfcc", "?").replace(" (downloaded)", ""),
             m.get("systemd", "?"), _verdict(r.get("install")),
             f"{_verdict(r.get('doctor_before'))} / {_verdict(r.get('fixes'))}",
             f"{_verdict(r.get('doctor_pipx'))} / {_verdict(r.get('doctor_venv'))}", shown, sysd_text]
    return "| " + " | ".join(cells) + " |"


def details(run: dict) -> list[str]:
    r = run["results"]
    out = [f"## {run['suite']} ({run.get('seconds', 0) / 60:.1f} min in the guest)", ""]
    inst = r.get("install") or {}
    if pk := inst.get("venv_packages"):
        out += [f"Installed into the venv by `pip install {inst.get('wheel')}`: {', '.join(pk)}.", ""]
    before = r.get("doctor_before") or {}
    if before.get("text"):
        out += [f"`accept-watch doctor` before python3-bpfcc and the headers (exit {before.get('rc')}):", "",
                "```", before["text"], "```", ""]
    for fix in (r.get("fixes") or {}).get("done", []):
        out.append(f"- ran `{fix['fix']}`: exit {fix['rc']}")
    for key in ("doctor_pipx", "doctor_venv"):
        d = r.get(key) or {}
        bcc = next((c["detail"] for c in d.get("checks", []) if c["name"] == "BCC"), "-")
        auto = next((c["detail"] for c in d.get("checks", []) if c["name"] == "auto would use"), "-")
        out.append(f"- doctor after the fixes ({key[7:]}): exit {d.get('rc')}, BCC {bcc}; "
                   f"auto would use {auto}")
    count = r.get("count") or {}
    if count:
        out += [f"- `--dry-run`: exit {(count.get('dry_run') or {}).get('rc')}",
                f"- count: accept-watch {count.get('watch')} vs the app's log {count.get('app')}"]
    sysd = r.get("systemd")
    if sysd:
        base = sysd.get("shipped") or {}
        caps = base.get("caps") or {}
        out += ["", "systemd unit (deploy/systemd/accept-watch.service as shipped: "
                f"`{sysd.get('exec_start', '?').removeprefix('ExecStart=')}`, the config file one "
                "`[[target]]` found by its pid file, a gunicorn service run as www-data):", "",
                f"- declared: {' '.join(sysd.get('declared', []))}; the running service: "
                f"CapEff {caps.get('CapEff')}, "
                f"CapPrm {caps.get('CapPrm')}, CapBnd {caps.get('CapBnd')}, CapAmb {caps.get('CapAmb')}, "
                f"NoNewPrivs {caps.get('NoNewPrivs')}, Uid {caps.get('Uid')}",
                f"- /metrics {base.get('metrics')} vs the app's log {base.get('app')}; ANSI in the journal: "
                f"{base.get('ansi_in_journal')}; export in the StateDirectory: {sysd.get('export_written')}; "
                f"{base.get('metrics_series')} accept_watch_* series, server labels "
                f"{base.get('metrics_servers')}",
                f"- kernel.perf_event_paranoid: {sysd.get('perf_event_paranoid_default')} at boot, "
                f"{sysd.get('perf_event_paranoid')} with deploy/systemd/accept-watch-sysctl.conf",
                f"- `systemd-analyze security`: {sysd.get('analyze_security') or '-'}", "",
                "| run | counts exactly | state | the journal's last error |", "|---|---|---|---|"]
        for e in sysd.get("experiments", []):
            out.append(f"| without {e.get('without')} | {e.get('works')} | {e.get('active')} "
                       f"| {_last_error(e.get('journal_tail', '')) if not e.get('works') else '-'} |")
    if run.get("problems"):
        out += ["", "Problems:", ""] + [f"- {_one_line(p, 600)}" for p in run["problems"]]
    return [*out, ""]


PHASES = (("boot", "boot (kernel + systemd, to the driver)"), ("install", "pipx ‖ venv install"),
          ("doctor_before", "doctor before"), ("fixes", "apt-get install (doctor's fixes)"),
          ("doctor_pipx", "doctor pipx ‖ venv (BCC compiles)"), ("count", "--dry-run + exact count"),
          ("systemd", "systemd unit runs"))


def phase_table(doc: dict) -> list[str]:
    """Where each guest's time went: seconds per phase, from the guest's own clock."""
    runs = doc.get("runs", [])
    out = ["| phase | " + " | ".join(r["suite"] for r in runs) + " |", "|---|" + "---|" * len(runs)]
    for kind, label in PHASES:
        cells = []
        for r in runs:
            res = r["results"].get(kind) or {}
            sec = float(res.get("uptime", 0)) if kind == "boot" else res.get("seconds")
            cells.append("-" if sec is None else f"{float(sec):.0f} s")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.append("| whole guest (QEMU start to power-off) | "
               + " | ".join(f"{r.get('seconds', 0):.0f} s" for r in runs) + " |")
    out.append("| QEMU's CPU time (user + system) | "
               + " | ".join(f"{r.get('qemu_cpu_seconds', 0):.0f} s" for r in runs) + " |")
    host = doc.get("host_seconds") or {}
    if host:
        out += ["", "Host side: " + ", ".join(f"{k} {v:.0f} s" for k, v in host.items()) + "."]
    loads = sorted(x for r in doc.get("runs", []) for x in r.get("loadavg", []))
    if loads:
        doc = {**doc, "loadavg_note": f"median {loads[len(loads) // 2]}, range {loads[0]}-{loads[-1]} during "
               "the guests' run"}
    if doc.get("loadavg_note"):
        out += ["", f"Host load average (1 min): {doc['loadavg_note']}."]
    if doc.get("loadavg_at_end"):
        out += ["", f"Host: {doc.get('cpus')} CPUs, load average at the end {doc['loadavg_at_end']} (the "
                "machine is shared with other jobs: phase times vary with their load)."]
    return out


INTRO = """
The wheel, and nothing else of the repository, on plain Debian 12 and Debian 13 systems, each
booting its own stock kernel with systemd under QEMU (TCG, no network: the wheel's dependencies are
PyPI's wheels, downloaded on the host for that Python). In each guest: `pipx install` (system-wide,
a plain venv: bcc loaded from Debian's directory) and a `--system-site-packages` venv (bcc
imported); `accept-watch doctor` before python3-bpfcc and the kernel headers are installed (it must
fail on exactly those and print their `apt-get install` commands); those commands run verbatim;
doctor again for both installs; `--dry-run`; an exact count of 200 connections to Debian's gunicorn
(3 sync workers) against the app's own per-pid log; then deploy/systemd/accept-watch.service as
shipped, `accept-watch serve --config /etc/accept-watch/serve.toml`, watching a gunicorn service run
as www-data: /metrics against the app's log, exactly the declared capabilities (each one shown
needed by a run without it), at Debian's `perf_event_paranoid=3` and with the shipped sysctl file.
What the kernel matrix proves (every probe path on 5.10/6.1/6.12) is not repeated here: the guests
use whatever probe `auto` picks.
"""


def render(doc: dict) -> str:
    lines = [
        "# Install check", "",
        "<!-- Generated by `make install-check` (scripts/install-check/run.py): do not edit. -->", "",
        *INTRO.strip().splitlines(), "",
        f"Run: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d')}, wheel `{doc.get('wheel')}`, "
        f"runtime requirements: {', '.join(doc.get('runtime', []))}.", "",
        "| Debian | kernel | Python | BCC | systemd | install | doctor before / fixes "
        "| doctor after (pipx / venv) | exact count | systemd unit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [suite_row(run) for run in doc.get("runs", [])]
    lines += ["", "## Where the time goes", "",
              "The two guests boot side by side (each QEMU TCG, 2 vCPUs, on this host's 2 cores); inside a "
              "guest the two installs and the two installs' doctors run side by side too.", "",
              *phase_table(doc), ""]
    for run in doc.get("runs", []):
        lines += details(run)
    lines += ["Reproduce: `make install-check` (root; builds and caches the two roots under",
              "`~/.cache/accept-watch/install-check/` on first use).", ""]
    return "\n".join(lines)
