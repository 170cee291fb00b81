#!/usr/bin/env bash
# Builds build/guest/{vmlinuz,initramfs.gz} for the e2e tests, the guest demo and the guest bench:
# a Debian cloud kernel (linux-image-cloud-amd64, fetched with `apt-get download` and unpacked with
# `dpkg -x`) and an initramfs holding busybox-static, e2fsprogs and fio (binaries plus every shared
# library `ldd` lists), the virtio modules, and an /init that runs the workload named on the kernel
# command line (`vblk.run=NAME`, see scripts/guest/workloads/) and prints its results on the
# serial console between `VBLK-BEGIN` and `VBLK-END` markers.
#
# Idempotent and cached: nothing is done when build/guest/initramfs.gz is newer than this script
# and scripts/guest/. Run as root (it may apt-get install busybox-static, fio, e2fsprogs).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$ROOT/build/guest"
SRC="$ROOT/scripts/guest"
# shellcheck source=lib/debian-kernel.sh
source "$ROOT/scripts/lib/debian-kernel.sh"
STAMP="$OUT/initramfs.gz"

if [[ -f "$STAMP" && -f "$OUT/vmlinuz" && "${VBLK_GUEST_REBUILD:-0}" != 1 ]]; then
  newer=$(find "$0" "$SRC" "$ROOT/scripts/lib/debian-kernel.sh" -newer "$STAMP" -print -quit)
  if [[ -z "$newer" ]]; then
    echo "build/guest is up to date"
    exit 0
  fi
fi

need_pkgs=()
command -v busybox >/dev/null || need_pkgs+=(busybox-static)
command -v fio >/dev/null || need_pkgs+=(fio)
command -v mkfs.ext4 >/dev/null || need_pkgs+=(e2fsprogs)
command -v objcopy >/dev/null || need_pkgs+=(binutils)
if ((${#need_pkgs[@]})); then
  echo "installing ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
# Not `busybox --list | grep -q`: under pipefail, grep -q exits at the first match, busybox gets
# SIGPIPE and the pipeline fails at random.
if ! grep -qx cpio <<<"$(busybox --list)"; then
  echo "busybox has no cpio applet; cannot build the initramfs" >&2
  exit 1
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"

# ---- kernel -------------------------------------------------------------------------------
echo "fetching linux-image-cloud-amd64"
fetch_cloud_kernel "$WORK"

# ---- initramfs tree -------------------------------------------------------------------------
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,dev,proc,sys,tmp,mnt,etc,lib/modules,workloads}
cp "$(command -v busybox)" "$R/bin/busybox"

# Modules, in load order. A driver built into this kernel (listed in modules.builtin) is skipped.
copy_modules "$R" virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk

# Binaries and their libraries (ldd's list, including the dynamic loader).
copy_bin() {
  local bin="$1" dst="$2"
  install -D -m 0755 "$bin" "$R$dst"
  ldd "$bin" | awk '/=>/ {print $3} /^\t\// {print $1}' | while read -r lib; do
    [[ -n "$lib" && -e "$lib" ]] || continue
    [[ -e "$R$lib" ]] || install -D -m 0755 "$(readlink -f "$lib")" "$R$lib"
  done
}
copy_bin "$(command -v fio)" /usr/bin/fio
for t in mke2fs e2fsck; do copy_bin "$(command -v $t)" "/sbin/$t"; done
ln -sf mke2fs "$R/sbin/mkfs.ext4"
ln -sf e2fsck "$R/sbin/fsck.ext4"
# x86-64 loader path used by every binary.
[[ -e "$R/lib64/ld-linux-x86-64.so.2" ]] || install -D /lib64/ld-linux-x86-64.so.2 "$R/lib64/ld-linux-x86-64.so.2"

cp "$SRC/init" "$R/init"
chmod 0755 "$R/init"
cp "$SRC"/workloads/*.sh "$R/workloads/"
chmod 0755 "$R"/workloads/*.sh

echo "packing initramfs ($(du -sh "$R" | cut -f1) unpacked)"
(cd "$R" && find . | busybox cpio -o -H newc 2>/dev/null) | gzip -1 > "$WORK/initramfs.gz"
cp "$VMLINUZ" "$OUT/vmlinuz"
echo "$KVER" > "$OUT/kernel-version"
mv "$WORK/initramfs.gz" "$STAMP"
echo "built $OUT (kernel $KVER, initramfs $(du -h "$STAMP" | cut -f1))"
