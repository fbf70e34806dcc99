#!/usr/bin/env bash
# Builds one install-check guest: a plain Debian SUITE system (bookworm = Debian 12, trixie = Debian 13)
# booting its own stock kernel with systemd as init, and nothing of accept-watch in it. The wheel, the
# PyPI wheels of its dependencies and the check script arrive on a second disk at every run.
#
# What a user would already have, or install as our README says, is split on purpose:
# - installed here: the base system, systemd, the suite's linux-image-amd64, Python with venv and
#   pipx, Debian's gunicorn (the server the check counts);
# - only downloaded here (kept in apt's cache): python3-bpfcc and linux-headers-<release>. The guest
#   has no network; inside it, `accept-watch doctor` must name what is missing and the command that
#   fixes it, and the check runs exactly those commands (apt installs them from the cache).
#
# usage: build_root.sh SUITE OUT_DIR
# Writes OUT_DIR/{root.img,vmlinuz,initrd.img,manifest.txt}, built in OUT_DIR.tmp and renamed at the end.
# Exit status: 0 built; 3 a package could not be fetched (network or archive trouble, not a test
# failure); anything else is a bug in the build.
set -euo pipefail

SUITE=${1:?usage: build_root.sh SUITE OUT_DIR}
OUT=${2:?usage: build_root.sh SUITE OUT_DIR}
MIRROR=${KM_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${KM_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
WORK=$OUT.tmp
ROOT=$WORK/rootfs
say() { printf 'build-root[%s]: %s\n' "$SUITE" "$*"; }
die() { printf 'build-root[%s]: error: %s\n' "$SUITE" "$*" >&2; exit 1; }
fetch_failed() { printf 'build-root[%s]: FETCH FAILED: %s (not a test failure)\n' "$SUITE" "$*" >&2; exit 3; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot, mounts)"
case $SUITE in bookworm | trixie) ;; *) die "suite must be bookworm or trixie, not $SUITE" ;; esac
for tool in debootstrap mkfs.ext4 chroot; do command -v "$tool" >/dev/null || die "$tool not found"; done

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

if [ -d "$WORK" ]; then
  { grep -o " $WORK/[^ ]*" /proc/mounts || true; } | sort -r | while read -r m; do umount -l "$m" || true; done
  rm -rf "$WORK"
fi
mkdir -p "$WORK"
start=$SECONDS

say "debootstrap $SUITE (minbase)"
nice -n 10 debootstrap --variant=minbase --keyring="$KEYRING" "$SUITE" "$ROOT" "$MIRROR" \
  >"$WORK/debootstrap.log" 2>&1 || { tail -n 5 "$WORK/debootstrap.log" >&2; fetch_failed "debootstrap $SUITE"; }
cat >"$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d" && chmod +x "$ROOT/usr/sbin/policy-rc.d"
mount_chroot

# systemd + udev: a real init, as the unit is tested under it. kmod/initramfs-tools: the kernel's initrd.
# python3-venv, pipx: the two install routes the README documents. gunicorn: Debian's (/usr/bin/gunicorn).
PKGS=(systemd systemd-sysv udev linux-image-amd64 kmod initramfs-tools zstd python3 python3-venv pipx gunicorn
      procps iproute2 util-linux ca-certificates)
say "installing ${PKGS[*]}"
in_chroot nice -n 10 apt-get update -q >"$WORK/apt.log" 2>&1 || fetch_failed "apt-get update"
in_chroot nice -n 10 apt-get install -y -q --no-install-recommends "${PKGS[@]}" >>"$WORK/apt.log" 2>&1 \
  || { tail -n 5 "$WORK/apt.log" >&2; fetch_failed "apt-get install"; }
in_chroot apt-get clean
KREL=$(basename "$(ls -d "$ROOT"/lib/modules/* | sort -V | tail -n 1)")
[ -f "$ROOT/boot/vmlinuz-$KREL" ] && [ -f "$ROOT/boot/initrd.img-$KREL" ] || die "no kernel/initrd for $KREL"

# Downloaded, not installed: what `accept-watch doctor` will ask for inside the guest.
say "downloading (not installing) python3-bpfcc linux-headers-$KREL"
# Exactly what the commands doctor prints will ask for (recommends included, as apt-get install does).
in_chroot nice -n 10 apt-get install -y -q --download-only python3-bpfcc "linux-headers-$KREL" \
  >>"$WORK/apt.log" 2>&1 || { tail -n 5 "$WORK/apt.log" >&2; fetch_failed "download python3-bpfcc linux-headers-$KREL"; }
# apt may drop downloaded packages after an install; this image keeps them for the offline guest.
echo 'APT::Keep-Downloaded-Packages "true";' >"$ROOT/etc/apt/apt.conf.d/90keep"

# --- the guest's boot: systemd, no getty, the check driver as a oneshot that powers off -------------
echo "install-check-$SUITE" >"$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n::1 localhost\n' >"$ROOT/etc/hosts"
: >"$ROOT/etc/machine-id"
for unit in serial-getty@ttyS0.service getty@tty1.service apt-daily.timer apt-daily-upgrade.timer \
            dpkg-db-backup.timer e2scrub_all.timer fstrim.timer systemd-timesyncd.service; do
  ln -sfn /dev/null "$ROOT/etc/systemd/system/$unit"
done
cat >"$ROOT/usr/local/sbin/ic-driver" <<'EOF'
#!/bin/bash
# Mounts this run's payload disk and hands over to its check script (the logic comes with each run).
mkdir -p /opt/ic
mount -o ro /dev/vdb /opt/ic || { echo "IC-FATAL no payload disk"; exit 1; }
exec /usr/bin/python3 /opt/ic/guest_check.py
EOF
chmod +x "$ROOT/usr/local/sbin/ic-driver"
cat >"$ROOT/etc/systemd/system/ic-driver.service" <<'EOF'
[Unit]
Description=accept-watch install-check driver
After=basic.target systemd-udev-settle.service
Wants=systemd-udev-settle.service
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/ic-driver
StandardOutput=journal+console
StandardError=journal+console
Environment=PYTHONUNBUFFERED=1 LC_ALL=C.UTF-8 TERM=dumb
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
EOF
ln -sfn /etc/systemd/system/ic-driver.service "$ROOT/etc/systemd/system/multi-user.target.wants/ic-driver.service"

{
  echo "suite $SUITE"
  echo "kernel $KREL"
  for p in python3 python3-bpfcc systemd pipx gunicorn "linux-headers-$KREL"; do
    v=$(in_chroot dpkg-query -W -f='${Version}' "$p" 2>/dev/null || true)
    [ -n "$v" ] || v=$(in_chroot apt-cache policy "$p" | awk '/Candidate:/ {print $2 " (downloaded)"}')
    echo "$p $v"
  done
} >"$WORK/manifest.txt"
umount_chroot
rm -f "$ROOT/usr/sbin/policy-rc.d"
rm -rf "$ROOT"/root/.cache "$ROOT"/tmp/*
cp "$ROOT/boot/vmlinuz-$KREL" "$WORK/vmlinuz"
cp "$ROOT/boot/initrd.img-$KREL" "$WORK/initrd.img"
used_mb=$(du -sm "$ROOT" | cut -f1)
size_mb=$((used_mb + used_mb / 5 + 1024))
say "mkfs.ext4 -d ($used_mb MB of files, ${size_mb} MB image)"
truncate -s "${size_mb}M" "$WORK/root.img"
nice -n 10 mkfs.ext4 -q -F -L ic-root -d "$ROOT" "$WORK/root.img" >/dev/null
rm -rf "$ROOT"
mv "$WORK" "$OUT"
say "done in $((SECONDS - start)) s: $OUT"
