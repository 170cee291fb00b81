#!/bin/sh
# Crash test, first boot: writes numbered 1 MiB chunks (fio, crc32c verify headers), each followed
# by fsync, and prints VBLK-FLUSHED N once chunk N is stable; meanwhile a second fio job writes
# randomly to the upper half of the disk. The host kills QEMU in the middle.
. /workloads/lib.sh
fio --name=noise --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 --bs=64k \
  --rw=randwrite --offset=50% --size=50% --time_based --runtime=600 --output=/dev/null >/dev/null 2>&1 &
i=0
while [ $i -lt 1000 ]; do
  fio --name=c$i --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=4 --bs=64k --rw=write \
    --offset=$((i * 1))M --size=1M --verify=crc32c --do_verify=0 --fsync_on_close=1 \
    --output=/dev/null >/dev/null 2>&1 || { echo "VBLK-RESULT chunk $i FAIL"; exit 1; }
  echo "VBLK-FLUSHED $i"
  i=$((i + 1))
done
