#!/usr/bin/env bash
# Builds the kernel-matrix guest image: one Debian bookworm userland (Python 3.11, BCC 0.26, as on
# our VMs) holding three stock Debian kernels unpacked with `dpkg -x`, so that only the kernel
# varies between guests. Kernel headers are set up by running scripts/setup.sh's own "Kernel
# headers" section in the chroot, once per kernel, with `uname -r` answering that kernel's release:
# the project's handling of a kernel without a headers package is part of what the matrix tests.
# The project's virtual environment is made by setup.sh's "Python virtual environment" section.
#
# usage: build_image.sh OUT_DIR REPO_DIR
# Writes OUT_DIR/{root.img,boot/vmlinuz-*,boot/initrd.img-*,manifest.json}, built in OUT_DIR.tmp
# and renamed at the end (a half-built image is never taken for a cached one).
# Exit status: 0 built; 3 a package could not be fetched (network or archive trouble, not a test
# failure); anything else is a bug in the build.
# Environment: KM_MIRROR (Debian mirror, default the one apt uses below), KM_KERNEL_SUITES
# (default "bullseye bookworm trixie").
set -euo pipefail

OUT=${1:?usage: build_image.sh OUT_DIR REPO_DIR}
REPO=$(cd "${2:?usage: build_image.sh OUT_DIR REPO_DIR}" && pwd)
MIRROR=${KM_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${KM_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
SUITES=${KM_KERNEL_SUITES:-bullseye bookworm trixie}

WORK=$OUT.tmp
ROOT=$WORK/rootfs
TAG=build-image
# shellcheck source=../lib/chroot-build.sh
. "$(dirname "$0")/../lib/chroot-build.sh"

[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot, mounts)"
for tool in debootstrap mkfs.ext4 chroot; do command -v "$tool" >/dev/null || die "$tool not found"; done

fresh_workdir
start=$SECONDS

# --- 1. bookworm minbase -----------------------------------------------------------------------------
debootstrap_minbase bookworm "$MIRROR" "$SECURITY_MIRROR"

say "installing the guest's packages"
# What `make test` needs from setup.sh's package list to run accept-watch (bcc, bpftool, venv,
# procps, iproute2), plus what the guest itself needs: kmod/initramfs-tools/busybox/zstd to build
# each kernel's initrd, util-linux for mount.
PKGS=(python3-bpfcc bpftool python3-venv procps iproute2 kmod initramfs-tools busybox zstd util-linux ca-certificates)
nice -n 10 chroot "$ROOT" apt-get update -q >"$WORK/apt.log" 2>&1 || fetch_failed "apt-get update (bookworm)"
in_chroot nice -n 10 apt-get install -y -q --no-install-recommends "${PKGS[@]}" >>"$WORK/apt.log" 2>&1 \
  || { tail -n 5 "$WORK/apt.log" >&2; fetch_failed "apt-get install ${PKGS[*]}"; }

# --- 2. the kernels: each suite's linux-image-amd64 target, unpacked with dpkg -x ------------------
# Other suites are read through a private apt state so the image's own apt (which setup.sh asks for
# linux-headers-<release>) only ever sees bookworm.
KRELS=()
BOOKWORM_KREL=
for suite in $SUITES; do
  if [ "$suite" = bookworm ]; then
    opts=()
  else
    d=/var/lib/km-apt/$suite
    mkdir -p "$ROOT$d/lists/partial" "$ROOT$d/cache/archives/partial"
    echo "deb $MIRROR $suite main" >"$ROOT$d/sources.list"
    opts=(-o "Dir::Etc::SourceList=$d/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
          -o "Dir::State::Lists=$d/lists" -o "Dir::Cache=$d/cache")
    in_chroot nice -n 10 apt-get "${opts[@]}" update -q >>"$WORK/apt.log" 2>&1 || fetch_failed "apt-get update ($suite)"
  fi
  pkg=$(in_chroot apt-cache "${opts[@]}" depends linux-image-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
  [ -n "$pkg" ] || fetch_failed "no linux-image-amd64 dependency found in $suite"
  mkdir -p "$ROOT/tmp/km-debs"
  in_chroot bash -c 'cd /tmp/km-debs && exec "$@"' _ nice -n 10 apt-get "${opts[@]}" download -q "$pkg" \
    >>"$WORK/apt.log" 2>&1 || fetch_failed "apt-get download $pkg ($suite)"
  deb=$(ls "$ROOT"/tmp/km-debs/"${pkg}"_*.deb | head -n 1)
  krel=${pkg#linux-image-}
  version=$(dpkg-deb -f "$deb" Version)
  say "kernel $krel ($suite, $version)"
  # `dpkg -x`, but keeping bookworm's merged-/usr symlinks (/lib -> usr/lib): a plain extraction of
  # an older kernel's ./lib/modules would replace the /lib symlink with a directory.
  dpkg-deb --fsys-tarfile "$deb" | tar -C "$ROOT" --keep-directory-symlink -xf -
  [ -f "$ROOT/boot/vmlinuz-$krel" ] || die "$deb has no /boot/vmlinuz-$krel"
  printf '%s\t%s\t%s\t%s\n' "$suite" "$krel" "$pkg" "$version" >>"$WORK/kernels.tsv"
  KRELS+=("$krel")
  [ "$suite" = bookworm ] && BOOKWORM_KREL=$krel
done
rm -rf "$ROOT/tmp/km-debs"

# --- 3. initrd per kernel: only what mounting a virtio ext4 root needs -------------------------------
mkdir -p "$ROOT/etc/km-initramfs"
cp -a "$ROOT/etc/initramfs-tools/." "$ROOT/etc/km-initramfs/"
sed -i 's/^MODULES=.*/MODULES=list/' "$ROOT/etc/km-initramfs/initramfs.conf"
printf '%s\n' virtio_pci virtio_blk ext4 >"$ROOT/etc/km-initramfs/modules"
for krel in "${KRELS[@]}"; do
  say "depmod + initrd for $krel"
  in_chroot depmod -a "$krel"
  in_chroot nice -n 10 mkinitramfs -d /etc/km-initramfs -o "/boot/initrd.img-$krel" "$krel" >>"$WORK/initrd.log" 2>&1 \
    || { tail -n 5 "$WORK/initrd.log" >&2; die "mkinitramfs $krel failed"; }
done

# --- 4. kernel headers: setup.sh's own section, once per kernel --------------------------------------
# The section is cut out of setup.sh between its "# --- Kernel headers" and "# --- tracefs" banners
# (with setup.sh's say/die), and run with a `uname` that reports the guest kernel's release.
section() {  # section START_BANNER END_BANNER_OR_EMPTY -> the lines of setup.sh in between
  local text
  if [ -n "$2" ]; then
    text=$(awk -v a="$1" -v b="$2" 'index($0, a) == 1 {on = 1} index($0, b) == 1 {on = 0} on' "$REPO/scripts/setup.sh")
  else
    text=$(awk -v a="$1" 'index($0, a) == 1 {on = 1} on' "$REPO/scripts/setup.sh")
  fi
  [ -n "$text" ] || die "scripts/setup.sh has no section starting with '$1' (its banners changed?)"
  printf '%s\n' "set -euo pipefail" "$(grep -E '^(say|die)\(\)' "$REPO/scripts/setup.sh")" "$text"
}
section "# --- Kernel headers" "# --- tracefs" >"$ROOT/tmp/km-headers.sh"
mkdir -p "$ROOT/tmp/km-shim"
# The bookworm kernel first: its linux-headers-<release> is in the image's apt sources (setup.sh's
# first branch). Done after a generic install, it would find that same package already in place.
HEADER_ORDER=($(printf '%s\n' "${KRELS[@]}" | awk -v b="$BOOKWORM_KREL" '$0 == b {print; next} {rest[++n] = $0} END {for (i = 1; i <= n; i++) print rest[i]}'))
for krel in "${HEADER_ORDER[@]}"; do
  cat >"$ROOT/tmp/km-shim/uname" <<EOF
#!/bin/sh
# Build-time stand-in: the chroot runs on the host's kernel; setup.sh must see the guest's.
[ "\$1" = -r ] && { echo $krel; exit 0; }
exec /usr/bin/uname "\$@"
EOF
  chmod +x "$ROOT/tmp/km-shim/uname"
  say "setup.sh kernel headers for $krel:"
  out=$(chroot "$ROOT" /usr/bin/env -i PATH=/tmp/km-shim:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 \
        nice -n 10 bash /tmp/km-headers.sh 2>&1) || { printf '%s\n' "$out" | tail -n 20 >&2; fetch_failed "setup.sh kernel headers for $krel"; }
  [ -n "$out" ] || out="setup: nothing to do (headers already present)"
  printf '%s\n' "$out" | sed 's/^/  /'
  [ -e "$ROOT/lib/modules/$krel/build/include/generated/autoconf.h" ] || die "no headers for $krel after setup.sh"
  printf '%s\t%s\n' "$krel" "$(printf '%s\n' "$out" | grep '^setup:' | tr '\n' ' ' | sed 's/ *$//')" >>"$WORK/headers.tsv"
  printf '%s\t%s\n' "$krel" "$(readlink -f "$ROOT/lib/modules/$krel/build" | sed "s|^$ROOT||")" >>"$WORK/headers-dirs.tsv"
done
rm -rf "$ROOT/tmp/km-shim" "$ROOT/tmp/km-headers.sh"

# --- 5. the project and its virtual environment (setup.sh's own section) ----------------------------
# The guest gets the current sources on a second disk at every run; this copy only has to make
# the editable install (its path, /opt/accept-watch, is where the guest puts the sources).
say "project virtual environment"
mkdir -p "$ROOT/opt/accept-watch"
(cd "$REPO" && git ls-files -z -co --exclude-standard | grep -zv '^\.venv/' | xargs -0 cp --parents -t "$ROOT/opt/accept-watch")
section "# --- Python virtual environment" "" >"$ROOT/tmp/km-venv.sh"
# pip inside the chroot trusts what the host's pip trusts (a host behind a TLS-inspecting proxy has
# its CA there and nowhere in the fresh chroot); the bundle is removed with /tmp below.
host_ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
pip_env=()
if [ -f "$host_ca" ]; then
  cp "$host_ca" "$ROOT/tmp/km-host-ca.crt"
  pip_env=(PIP_CERT=/tmp/km-host-ca.crt)
fi
out=$(chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 "${pip_env[@]}" \
      sh -c 'cd /opt/accept-watch && nice -n 10 bash /tmp/km-venv.sh' 2>&1) \
  || { printf '%s\n' "$out" | tail -n 20 >&2; fetch_failed "setup.sh virtual environment (PyPI)"; }
printf '%s\n' "$out" >"$WORK/venv.log"
{ grep '^setup:' "$WORK/venv.log" || true; } | sed 's/^/  /'  # pip's own chatter stays in venv.log
rm -f "$ROOT/tmp/km-venv.sh" "$ROOT/tmp/km-host-ca.crt"

# --- 6. guest boot: a stub init that hands over to the run's guest-init.sh --------------------------
cat >"$ROOT/sbin/km-init" <<'EOF'
#!/bin/bash
# PID 1 of a kernel-matrix guest. The test logic arrives with the sources on /dev/vdb at every run.
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /opt/src
if mount -o ro /dev/vdb /opt/src && [ -f /opt/src/scripts/kernel-matrix/guest-init.sh ]; then
  exec /bin/bash /opt/src/scripts/kernel-matrix/guest-init.sh
fi
echo "KM-FATAL km-init: no sources disk with scripts/kernel-matrix/guest-init.sh"
echo o >/proc/sysrq-trigger
sleep 60
EOF
chmod +x "$ROOT/sbin/km-init"
echo kernel-matrix >"$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n::1 localhost\n' >"$ROOT/etc/hosts"

# --- 7. package versions for the report, then the raw ext4 image -------------------------------------
{
  echo "python3 $(in_chroot dpkg-query -W -f='${Version}' python3)"
  echo "python3-bpfcc $(in_chroot dpkg-query -W -f='${Version}' python3-bpfcc)"
  echo "gunicorn $(in_chroot /opt/accept-watch/.venv/bin/python -c 'import gunicorn; print(gunicorn.__version__)')"
} >"$WORK/userland.txt"
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/km-apt "$ROOT"/root/.cache "$ROOT"/tmp/*
mkdir -p "$WORK/boot"
for krel in "${KRELS[@]}"; do
  cp "$ROOT/boot/vmlinuz-$krel" "$ROOT/boot/initrd.img-$krel" "$WORK/boot/"
done
finish_image km-root
