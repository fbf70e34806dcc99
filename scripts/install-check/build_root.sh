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
WORK=$OUT.tmp
ROOT=$WORK/rootfs
TAG="build-root[$SUITE]"
# shellcheck source=../lib/chroot-build.sh
. "$(dirname "$0")/../lib/chroot-build.sh"

[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot, mounts)"
case $SUITE in bookworm | trixie) ;; *) die "suite must be bookworm or trixie, not $SUITE" ;; esac
for tool in debootstrap mkfs.ext4 chroot; do command -v "$tool" >/dev/null || die "$tool not found"; done

fresh_workdir
start=$SECONDS
debootstrap_minbase "$SUITE" "$MIRROR" "$SECURITY_MIRROR"

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
# The guest boots a small initrd (as the kernel matrix does): only what mounting a virtio ext4 root
# needs. Debian's own initrd (MODULES=most, ~30 MB) stays in /boot untouched; under TCG the small one
# saves its decompression and udev's module loading at every boot.
mkdir -p "$ROOT/etc/ic-initramfs"
cp -a "$ROOT/etc/initramfs-tools/." "$ROOT/etc/ic-initramfs/"
sed -i 's/^MODULES=.*/MODULES=list/' "$ROOT/etc/ic-initramfs/initramfs.conf"
printf '%s\n' virtio_pci virtio_blk ext4 >"$ROOT/etc/ic-initramfs/modules"
in_chroot nice -n 10 mkinitramfs -d /etc/ic-initramfs -o /tmp/ic-initrd.img "$KREL" >>"$WORK/apt.log" 2>&1 \
  || { tail -n 5 "$WORK/apt.log" >&2; die "mkinitramfs $KREL failed"; }
rm -rf "$ROOT/etc/ic-initramfs"

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
# The payload disk's device unit, not systemd-udev-settle (deprecated, and seconds of waiting on
# every device under TCG).
After=basic.target dev-vdb.device
Requires=dev-vdb.device
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
cp "$ROOT/boot/vmlinuz-$KREL" "$WORK/vmlinuz"
mv "$ROOT/tmp/ic-initrd.img" "$WORK/initrd.img"
rm -rf "$ROOT"/root/.cache "$ROOT"/tmp/*
finish_image ic-root
