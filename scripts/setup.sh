#!/usr/bin/env bash
# One-shot, idempotent set-up for a fresh Debian 12 VM (run as root): everything `make demo`,
# `make test` and `make bench` need. Each step says what it does; nothing is downloaded except
# Debian and PyPI packages.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (BCC needs root to load eBPF programs; apt-get installs packages)"

# --- Debian packages ---------------------------------------------------------------------------
# python3-bpfcc: BCC's Python bindings (the PyPI "bcc" is an unrelated project).
# bpftool: lists loaded programs (tests check nothing of ours stays attached).
# nginx-light, wrk, bpftrace: the benchmark's server, load generator and ad-hoc comparison.
# chromium: the dashboard's browser tests (Debian's build; no tool downloads its own browser).
# apache2: Apache prefork for the real-server verdict tests (run with our own config, never the system one).
# prometheus: promtool (checks the alert rules and /metrics) and the server the Grafana-panel test scrapes
# with (own config and storage in a temp dir, loopback port).
# php-fpm: the php-fpm pool tests (static and dynamic pools behind nginx; own config in a temp dir).
# podman, runc, debootstrap: the container image and the container tests (`make containers`): images are
# built from a debootstrapped Debian root (no registry); runc because crun refuses hybrid cgroups.
PKGS=(python3-bpfcc bpftool python3-venv nginx-light wrk bpftrace chromium chromium-driver procps iproute2
  apache2 prometheus podman runc debootstrap php-fpm)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  # Another apt run (the machine may be shared) holds the dpkg lock for a while: wait for it.
  apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends \
    "${missing[@]}" >/dev/null
fi
# Debian's nginx package starts a server on :80 at install; we run our own instances.
systemctl disable --now nginx >/dev/null 2>&1 || true
# Likewise Debian's apache2 (:80): the tests run the binary with their own config in a temp dir.
systemctl disable --now apache2 >/dev/null 2>&1 || true
# Likewise Debian's prometheus (:9090, scraping itself into /var/lib/prometheus): the tests run the
# binary with their own config and storage in a temp dir, on a free loopback port.
systemctl disable --now prometheus >/dev/null 2>&1 || true
# Likewise Debian's php-fpm service (its unit is named after the PHP version, php8.2-fpm on Debian 12).
for unit in /lib/systemd/system/php*-fpm.service; do
  if [ -e "$unit" ]; then systemctl disable --now "$(basename "$unit")" >/dev/null 2>&1 || true; fi
done

# --- Kernel headers for BCC's run-time compiler ------------------------------------------------
# BCC compiles the BPF C at run time against kernel headers. Our programs read every kernel struct
# through offsets taken from the running kernel's BTF, so headers only need to compile, not match.
KREL=$(uname -r)
BUILD=/lib/modules/$KREL/build
if [ ! -e "$BUILD/include/generated/autoconf.h" ] || [ ! -e "/lib/modules/$KREL/source/include/linux/kconfig.h" ]; then
  if apt-cache show "linux-headers-$KREL" >/dev/null 2>&1; then
    say "installing linux-headers-$KREL"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "linux-headers-$KREL" >/dev/null
  else
    say "no linux-headers-$KREL package for this kernel: using Debian's generic headers (struct offsets come from BTF, not from these)"
    dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q "install ok installed" || {
      apt-get update -q >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q linux-headers-amd64 >/dev/null
    }
    # Debian splits headers: the arch part (generated config) and the common part (sources),
    # as its own kernels link them from build/ and source/.
    generic=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    [ -n "$generic" ] || die "linux-headers-amd64 installed no /usr/src/linux-headers-*-amd64"
    common=${generic%-amd64}-common
    [ -d "$common" ] || die "$common is missing (expected beside $generic)"
    mkdir -p "/lib/modules/$KREL"
    ln -sfn "$generic" "/lib/modules/$KREL/build"
    ln -sfn "$common" "/lib/modules/$KREL/source"
    say "linked /lib/modules/$KREL/build -> $generic, source -> $common"
  fi
fi

# --- tracefs / debugfs ---------------------------------------------------------------------------
# BCC reads tracepoint formats from tracefs; a fresh VM mounts neither.
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug

# --- Python virtual environment ------------------------------------------------------------------
# Debian's interpreter, so that Debian's bcc (pure Python over libbcc) matches it.
PY=/usr/bin/python3
[ -x "$PY" ] || die "$PY not found (Debian's python3)"
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $PY"
  "$PY" -m venv .venv
fi
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Make only Debian's bcc importable (not all of dist-packages).
ln -sfn /usr/lib/python3/dist-packages/bcc "$SITE/bcc"
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  say "installing accept-watch and its test dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
.venv/bin/python -c 'import bcc, accept_watch.daemon' || die "accept_watch or bcc not importable in .venv"
say "ready"
