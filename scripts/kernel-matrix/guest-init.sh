#!/bin/bash
# Runs as PID 1 inside a kernel-matrix guest (exec'd by the image's /sbin/km-init, which mounted this
# run's sources read-only on /opt/src). Prepares the machine as scripts/setup.sh would (tracefs,
# debugfs), puts the sources over the image's editable install, runs tests/matrix/guest_run.py,
# and powers off. Everything it says goes to the serial console, which the host parses.
# Kernel command line: km.n=N km.paths=fexit,kretprobe,tracepoint,auto (optional).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 TERM=dumb
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

poweroff_now() {
  echo "KM-END rc=${1:-?}"
  sync
  echo o >/proc/sysrq-trigger
  sleep 60
}
trap 'poweroff_now $?' EXIT

echo "KM-BOOT kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"
set -e
mountpoint -q /tmp || mount -t tmpfs -o size=512m tmpfs /tmp
mountpoint -q /run || mount -t tmpfs tmpfs /run
mountpoint -q /dev/shm || { mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm; }
mountpoint -q /dev/pts || { mkdir -p /dev/pts && mount -t devpts devpts /dev/pts; }
# What setup.sh's "tracefs / debugfs" section does on a fresh VM.
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug
# No network device (-net none); clients and servers talk over loopback only.
ip link set lo up
hostname kernel-matrix

# This run's sources replace the build-time copy; .venv (the editable install) stays.
find /opt/accept-watch -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
cp -a /opt/src/. /opt/accept-watch/
set +e

n=400
paths=fexit,kretprobe,tracepoint,auto
for arg in $(cat /proc/cmdline); do
  case $arg in
    km.n=*) n=${arg#km.n=} ;;
    km.paths=*) paths=${arg#km.paths=} ;;
  esac
done
cd /opt/accept-watch
.venv/bin/python tests/matrix/guest_run.py --n "$n" --paths "$paths" 2>&1
rc=$?
exit $rc
