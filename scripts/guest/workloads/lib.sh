# Helpers sourced by every workload (also exported to them through the environment).
param() {
  for kv in $(cat /proc/cmdline); do
    case "$kv" in "vblk.$1="*) echo "${kv#*=}"; return ;; esac
  done
  echo "$2"
}
