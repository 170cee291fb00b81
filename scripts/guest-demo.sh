#!/usr/bin/env bash
# Guest demo: a real Linux guest (QEMU TCG) uses `vblk serve` as its disk over vhost-user-blk.
#   1. create a qcow2 image (vblk create, or qemu-img create when vblk has no create command)
#   2. vblk serve it on a Unix socket
#   3. boot the test guest (build/guest/, scripts/build-guest.sh): mkfs.ext4, mount, write files,
#      md5, unmount, remount + md5 again, fstrim, fsck — all inside the guest
#   4. stop vblk serve (SIGTERM: drain, flush, close), then check the image on the host with
#      vblk check (when available) and qemu-img check
# Prints a short report; exits non-zero when any step fails. Needs: make build, make guest.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VBLK=(node "$ROOT/build/src/cli/main.js")
GUEST="$ROOT/build/guest"
[[ -f "$ROOT/build/src/cli/main.js" ]] || { echo "guest-demo: run 'make build' first" >&2; exit 1; }
bash "$ROOT/scripts/build-guest.sh" >/dev/null
command -v qemu-system-x86_64 >/dev/null || { echo "guest-demo: qemu-system-x86_64 is missing (apt-get install qemu-system-x86)" >&2; exit 1; }

TMP="$(mktemp -d)"
SERVE_PID=""
cleanup() {
  [[ -n "$SERVE_PID" ]] && kill "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT

# (A here-string, not a pipe into grep -q: under pipefail an early grep exit fails the pipe.)
has_cmd() { grep -q "^  $1 " <<<"$("${VBLK[@]}" --help)"; }

step() { printf '\n== %s\n' "$*"; }

# 1. the image --------------------------------------------------------------------------------
IMG="$TMP/demo.qcow2"
FMT=qcow2
step "create a 256 MiB qcow2 image"
if has_cmd create; then
  "${VBLK[@]}" create -f qcow2 "$IMG" 256M
else
  echo "(vblk create is not available yet: using qemu-img create)"
  qemu-img create -q -f qcow2 "$IMG" 256M
fi

# 2. serve it ---------------------------------------------------------------------------------
start_serve() {
  rm -f "$TMP/vblk.sock"
  "${VBLK[@]}" serve --socket "$TMP/vblk.sock" "$IMG" >"$TMP/serve.log" 2>&1 &
  SERVE_PID=$!
  for _ in $(seq 100); do
    [[ -S "$TMP/vblk.sock" ]] && return 0
    kill -0 "$SERVE_PID" 2>/dev/null || break
    sleep 0.1
  done
  SERVE_PID=""
  return 1
}
step "vblk serve --socket $TMP/vblk.sock $(basename "$IMG")"
if ! start_serve; then
  if grep -q "read-write" "$TMP/serve.log"; then
    echo "(this build cannot write qcow2 yet: $(tail -1 "$TMP/serve.log"))"
    echo "(falling back to a raw image)"
    IMG="$TMP/demo.raw"
    FMT=raw
    truncate -s 256M "$IMG"
    start_serve || { cat "$TMP/serve.log"; exit 1; }
  else
    cat "$TMP/serve.log"
    exit 1
  fi
fi
head -1 "$TMP/serve.log"

# 3. the guest --------------------------------------------------------------------------------
step "boot the Linux guest (QEMU TCG, vhost-user-blk-pci): mkfs.ext4, write, md5, fsck"
START=$(date +%s.%N)
set +e
timeout 300 qemu-system-x86_64 -accel tcg -cpu max -m 512 -smp 1 -nographic -no-reboot -nodefaults -serial stdio \
  -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.gz" \
  -append "console=ttyS0 reboot=t panic=-1 quiet vblk.run=fs vblk.files=8 vblk.filemb=4" \
  -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
  -chardev socket,id=c0,path="$TMP/vblk.sock" -device vhost-user-blk-pci,chardev=c0 \
  2>&1 | tr -d '\r' | grep -a 'VBLK-' | sed 's/^.*VBLK-/VBLK-/' | tee "$TMP/guest.log"
set -e
END=$(date +%s.%N)
GUEST_RC=$(sed -n 's/^VBLK-END .* rc=\([0-9]*\).*/\1/p' "$TMP/guest.log")

# 4. stop and check ---------------------------------------------------------------------------
step "stop vblk serve (SIGTERM: drain, flush, close)"
kill -TERM "$SERVE_PID"
wait "$SERVE_PID" && SERVE_RC=0 || SERVE_RC=$?
SERVE_PID=""
cat "$TMP/serve.log"

CHECKS=()
if [[ $FMT == qcow2 ]]; then
  if has_cmd check; then
    step "vblk check"
    if "${VBLK[@]}" check "$IMG"; then CHECKS+=("vblk check: clean"); else CHECKS+=("vblk check: FAILED"); fi
  else
    CHECKS+=("vblk check: not available in this build")
  fi
  step "qemu-img check"
  if qemu-img check "$IMG"; then CHECKS+=("qemu-img check: clean"); else CHECKS+=("qemu-img check: FAILED"); fi
else
  step "e2fsck -fn on the raw image (host side)"
  if e2fsck -fn "$IMG"; then CHECKS+=("host e2fsck: clean"); else CHECKS+=("host e2fsck: FAILED"); fi
fi

# report ----------------------------------------------------------------------------------------
step "report"
printf 'image           %s (%s, %s)\n' "$(basename "$IMG")" "$FMT" "$(du -h "$IMG" | cut -f1) allocated"
printf 'guest           %s s, workload rc=%s\n' "$(awk -v a="$START" -v b="$END" 'BEGIN { printf "%.1f", b - a }')" "${GUEST_RC:-none}"
for r in mkfs md5 fstrim fsck; do
  printf '  %-13s %s\n' "$r" "$(sed -n "s/^VBLK-RESULT $r //p" "$TMP/guest.log")"
done
printf 'files written   %s (md5 checked after a remount)\n' "$(grep -c '^VBLK-MD5' "$TMP/guest.log")"
printf 'vblk serve      exit %s\n' "$SERVE_RC"
for c in "${CHECKS[@]}"; do printf '%s\n' "$c"; done
if [[ "${GUEST_RC:-x}" == 0 && $SERVE_RC == 0 ]] && ! grep -q FAILED <<<"$(printf '%s\n' "${CHECKS[@]}")"; then
  echo "RESULT: PASS"
else
  echo "RESULT: FAIL"
  exit 1
fi
