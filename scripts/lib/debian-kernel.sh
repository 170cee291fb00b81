# Sourced by scripts/build-guest.sh and scripts/build-kvm-guest.sh: the Debian cloud kernel both
# guests boot, and the copying of its modules into an initramfs tree.

# fetch_cloud_kernel WORK: downloads linux-image-cloud-amd64's kernel package (apt-get download,
# no install) and unpacks it under WORK/kernel. Sets VMLINUZ, KVER and MODDIR.
fetch_cloud_kernel() {
  local work="$1"
  (
    cd "$work"
    local meta=linux-image-cloud-amd64 image
    [[ -n "$(apt-cache policy "$meta" | awk '/Candidate/{print $2}' | grep -v none || true)" ]] || apt-get update -qq
    image=$(apt-cache depends "$meta" | awk '/Depends: linux-image-/{print $2; exit}')
    [[ -n "$image" ]] || { echo "cannot resolve $meta to a kernel package" >&2; exit 1; }
    apt-get download -qq "$image" 2>/dev/null || { apt-get update -qq && apt-get download -qq "$image"; }
    mkdir kernel
    dpkg -x ./*.deb kernel
  ) || return 1
  VMLINUZ=$(ls "$work"/kernel/boot/vmlinuz-* | head -1)
  KVER=$(basename "$VMLINUZ" | sed 's/^vmlinuz-//')
  MODDIR="$work/kernel/lib/modules/$KVER"
}

# copy_modules ROOT MODULE...: copies each module of MODDIR (decompressed) to ROOT/lib/modules and
# lists it, in the order given (the load order: the package has no modules.dep), in
# ROOT/etc/modules. A module built into the kernel (modules.builtin) is skipped.
copy_modules() {
  local root="$1" m f
  shift
  mkdir -p "$root/lib/modules" "$root/etc"
  : > "$root/etc/modules"
  for m in "$@"; do
    f=$(find "$MODDIR/kernel" -name "$m.ko*" | head -1)
    if [[ -z "$f" ]]; then
      if grep -q "/$m.ko" "$MODDIR/modules.builtin"; then continue; fi
      echo "module $m is neither built in nor shipped by $KVER" >&2
      return 1
    fi
    case "$f" in
      *.ko.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
      *.ko.zst) zstd -qdc "$f" > "$root/lib/modules/$m.ko" ;;
      *) cp "$f" "$root/lib/modules/$m.ko" ;;
    esac
    echo "$m" >> "$root/etc/modules"
  done
}
