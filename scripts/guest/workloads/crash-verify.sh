#!/bin/sh
# Crash test, second boot: every chunk the first boot reported flushed (vblk.chunks=N) verifies.
. /workloads/lib.sh
n=$(param chunks 0)
i=0
bad=0
while [ $i -lt "$n" ]; do
  fio --name=c$i --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=4 --bs=64k --rw=write \
    --offset=$((i * 1))M --size=1M --verify=crc32c --verify_only --verify_fatal=1 \
    --output=/tmp/v.log >/dev/null 2>&1 || { bad=$((bad + 1)); echo "VBLK-RESULT chunk $i FAIL"; }
  i=$((i + 1))
done
echo "VBLK-RESULT verified $n chunks, $bad bad"
[ $bad -eq 0 ]
