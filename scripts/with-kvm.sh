#!/usr/bin/env bash
# scripts/with-kvm.sh CMD [ARGS...]: runs CMD with a usable /dev/kvm and exits with its status.
#
# Where this machine has /dev/kvm, CMD runs directly. Otherwise it runs inside a QEMU TCG guest
# with nested virtualization (-cpu max exposes AMD SVM): the guest sees this machine's root over
# virtio-fs at the same paths, so files CMD writes land here, and CMD runs in the same working
# directory with the same environment. CMD's stdout and stderr come back separately (through
# files on the shared root, streamed as they grow); kernel messages stay out of them.
#
# Exit status: CMD's; 2 with one line on stderr when no KVM can be had (no QEMU, no nested SVM,
# the guest cannot be built); 124 when the guest is still running after VBLK_KVM_TIMEOUT seconds
# (default 1200) and was killed. VBLK_KVM_NESTED=1 forces the nested guest even where /dev/kvm
# exists (to test this script).
set -uo pipefail

if [[ $# -eq 0 ]]; then echo "usage: scripts/with-kvm.sh CMD [ARGS...]" >&2; exit 2; fi
# Inside the nested guest already (VBLK_IN_NESTED_KVM), or /dev/kvm usable here: run directly.
if [[ "${VBLK_IN_NESTED_KVM:-0}" == 1 ]]; then exec "$@"; fi
if [[ "${VBLK_KVM_NESTED:-0}" != 1 && -c /dev/kvm && -r /dev/kvm && -w /dev/kvm ]]; then exec "$@"; fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TIMEOUT="${VBLK_KVM_TIMEOUT:-1200}"
VIRTIOFSD=/usr/lib/qemu/virtiofsd
say() { echo "with-kvm: $*" >&2; }
command -v qemu-system-x86_64 >/dev/null || { say "no /dev/kvm here and no qemu-system-x86_64 for a nested guest (apt-get install qemu-system-x86)"; exit 2; }
[[ -x "$VIRTIOFSD" ]] || { say "no /dev/kvm here and no $VIRTIOFSD to share files with a nested guest (apt-get install qemu-system-x86)"; exit 2; }
if ! build_log=$(bash "$ROOT/scripts/build-kvm-guest.sh" 2>&1); then
  say "cannot build the nested guest: $(tail -n 1 <<<"$build_log")"
  exit 2
fi

WORK="$(mktemp -d /tmp/vblk-with-kvm.XXXXXX)"
VFSD_PID=""
QEMU_PID=""
cleanup() {
  [[ -n "$QEMU_PID" ]] && kill -9 "$QEMU_PID" 2>/dev/null
  [[ -n "$VFSD_PID" ]] && kill "$VFSD_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The command, its directory and its environment, as a script the guest runs in the chroot.
{
  echo "cd $(printf '%q' "$PWD") || exit 127"
  while IFS= read -r -d '' kv; do
    name="${kv%%=*}"
    [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
    case "$name" in PWD | OLDPWD | SHLVL | _ | TERM) continue ;; esac
    echo "export $name=$(printf '%q' "${kv#*=}")"
  done < <(env -0)
  echo "export VBLK_IN_NESTED_KVM=1"
  printf 'exec'
  printf ' %q' "$@"
  echo
} > "$WORK/cmd.sh"
: > "$WORK/out"
: > "$WORK/err"

"$VIRTIOFSD" --socket-path="$WORK/vfs.sock" -o source=/ -o cache=auto -o sandbox=chroot -o log_level=err > "$WORK/virtiofsd.log" 2>&1 &
VFSD_PID=$!
for _ in $(seq 100); do [[ -S "$WORK/vfs.sock" ]] && break; sleep 0.05; done
[[ -S "$WORK/vfs.sock" ]] || { say "virtiofsd did not start: $(tail -n 1 "$WORK/virtiofsd.log")"; exit 2; }

timeout -s KILL "$TIMEOUT" qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m 2G \
  -object memory-backend-memfd,id=mem,size=2G,share=on -numa node,memdev=mem \
  -chardev socket,id=vfs,path="$WORK/vfs.sock" -device vhost-user-fs-pci,chardev=vfs,tag=host \
  -kernel "$ROOT/build/kvm-guest/vmlinuz" -initrd "$ROOT/build/kvm-guest/initramfs.gz" \
  -append "console=ttyS0 quiet loglevel=0 panic=-1 vblk.work=$WORK" \
  -nographic -no-reboot -nodefaults -serial file:"$WORK/console.log" -monitor none &
QEMU_PID=$!
# Stream the command's output as the guest writes it.
tail -n +1 -F --pid="$QEMU_PID" "$WORK/out" 2>/dev/null &
tail -n +1 -F --pid="$QEMU_PID" "$WORK/err" >&2 2>/dev/null &
wait "$QEMU_PID"
qemu_rc=$?
QEMU_PID=""
wait
if [[ $qemu_rc -eq 137 ]]; then say "the nested guest was still running after ${TIMEOUT} s (VBLK_KVM_TIMEOUT): killed"; exit 124; fi
rc=$(cat "$WORK/rc" 2>/dev/null || true)
case "$rc" in
  kvm-unavailable:*) say "${rc#kvm-unavailable: }"; exit 2 ;;
  '' ) say "the nested guest stopped before the command finished (QEMU exit $qemu_rc): $(tail -c 300 "$WORK/console.log" | tr -s '\r\n' ' ')"; exit 2 ;;
  *) exit "$rc" ;;
esac
