# Sourced by scripts/kernel-matrix/build_image.sh and scripts/install-check/build_root.sh: what building
# a Debian guest root in a chroot takes, the same for both. The caller sets TAG (message prefix),
# OUT (the finished directory), WORK (OUT.tmp) and ROOT (the chroot, under WORK); both callers hash this
# file into their cache keys, so a change here rebuilds their images.

say() { printf '%s: %s\n' "$TAG" "$*"; }
die() { printf '%s: error: %s\n' "$TAG" "$*" >&2; exit 1; }
fetch_failed() {
  printf '%s: FETCH FAILED: %s (package archive unreachable or incomplete; not a test failure)\n' "$TAG" "$*" >&2
  exit 3
}

# chroot mounts: apt's maintainer scripts need /proc and /dev; always undone on exit.
MOUNTS=()
mount_chroot() {
  mkdir -p "$ROOT/proc" "$ROOT/sys" "$ROOT/dev" "$ROOT/dev/pts"
  mount -t proc proc "$ROOT/proc" && MOUNTS+=("$ROOT/proc")
  mount -t sysfs sysfs "$ROOT/sys" && MOUNTS+=("$ROOT/sys")
  mount --bind /dev "$ROOT/dev" && MOUNTS+=("$ROOT/dev")
  mount -t devpts -o newinstance,ptmxmode=0666 devpts "$ROOT/dev/pts" && MOUNTS+=("$ROOT/dev/pts")
}
umount_chroot() {
  local i
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
    umount "${MOUNTS[$i]}" 2>/dev/null || umount -l "${MOUNTS[$i]}" 2>/dev/null || true
  done
  MOUNTS=()
}
trap umount_chroot EXIT
in_chroot() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
  DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"; }

# A previous build that died may have left mounts under WORK: undo them before deleting it.
fresh_workdir() {
  if [ -d "$WORK" ]; then
    { grep -o " $WORK/[^ ]*" /proc/mounts || true; } | sort -r | while read -r m; do umount -l "$m" || true; done
    rm -rf "$WORK"
  fi
  mkdir -p "$WORK"
}

# debootstrap_minbase SUITE MIRROR SECURITY_MIRROR: a minbase SUITE in ROOT with apt pointed at the
# suite, its updates and its security archive, the host's resolver, no daemon started by package
# installs (policy-rc.d), and the chroot mounts up.
debootstrap_minbase() {
  local suite=$1 mirror=$2 security=$3
  say "debootstrap $suite (minbase)"
  nice -n 10 debootstrap --variant=minbase --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    "$suite" "$ROOT" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 5 "$WORK/debootstrap.log" >&2; fetch_failed "debootstrap $suite"; }
  printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s %s-security main\n' \
    "$mirror" "$suite" "$mirror" "$suite" "$security" "$suite" >"$ROOT/etc/apt/sources.list"
  cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d" && chmod +x "$ROOT/usr/sbin/policy-rc.d"
  mount_chroot
}

# finish_image LABEL: unmount, the raw ext4 image WORK/root.img from ROOT (room for the guest's own
# runs: pycache, logs, packages installed in the guest), ROOT removed, WORK renamed to OUT (a
# half-built image is never taken for a cached one).
finish_image() {
  umount_chroot
  rm -f "$ROOT/usr/sbin/policy-rc.d"
  local used_mb size_mb
  used_mb=$(du -sm "$ROOT" | cut -f1)
  size_mb=$((used_mb + used_mb / 5 + 1024))
  say "mkfs.ext4 -d ($used_mb MB of files, ${size_mb} MB image)"
  truncate -s "${size_mb}M" "$WORK/root.img"
  nice -n 10 mkfs.ext4 -q -F -L "$1" -d "$ROOT" "$WORK/root.img" >/dev/null
  rm -rf "$ROOT"
  mv "$WORK" "$OUT"
  say "done in $((SECONDS - start)) s: $OUT"
}
