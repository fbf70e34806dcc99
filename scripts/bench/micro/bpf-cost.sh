#!/bin/bash
# BPF run time per connection of accept-watch's programs, on the pinned loopback benchmark.
# Usage (root, from the repository): scripts/bench/micro/bpf-cost.sh [N] [accept-watch options...]
# Builds connbench, runs N connections on CPU 0 with accept-watch attached (on CPU 1) and
# kernel.bpf_stats_enabled=1 (restored afterwards), prints ns per call and per connection of each
# program, and accept-watch's total. The statistics add two clock reads per call (~35-40 ns here).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
n=${1:-200000}; shift || true
work=$(mktemp -d)
trap 'rm -rf "$work"; [ -n "${prev:-}" ] && sysctl -qw kernel.bpf_stats_enabled="$prev"' EXIT
gcc -O2 -o "$work/connbench" "$here/connbench.c"
prev=$(sysctl -n kernel.bpf_stats_enabled)
sysctl -qw kernel.bpf_stats_enabled=1
taskset -c 0 "$work/connbench" "$n" $((20000 + RANDOM % 20000)) 4 > "$work/out" &
bench=$!
sleep 0.5
pid=$(awk '/^pid/ {print $2}' "$work/out")
taskset -c 1 "$repo/.venv/bin/accept-watch" --pid "$pid" --no-dashboard --quiet \
    --export "$work/export.json" "$@" > "$work/aw.log" 2>&1 &
aw=$!
wait "$bench"
bpftool prog show -j | N="$n" python3 -c '
import json, os, sys
n = int(os.environ["N"]); total = 0
for p in json.load(sys.stdin):
    if p.get("run_cnt", 0) > 100:
        per = p["run_time_ns"] / n; total += per
        name, calls, ns = p["name"], p["run_cnt"], p["run_time_ns"]
        print(f"{name:42s} {calls / n:5.1f} calls/conn {ns // calls:5d} ns/call {per:6.0f} ns/conn")
print(f"total {total:.0f} ns per connection")'
tail -1 "$work/out"
kill -INT "$aw"; wait "$aw" || true
python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('accept-watch total', d['total_accepts'], 'unattributed', d['unattributed'])" "$work/export.json"
