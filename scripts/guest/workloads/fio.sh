#!/bin/sh
# fio verify matrix: random write + read-back verification (crc32c) at several block sizes and
# queue depths, each job on its own region of the disk; then discard (blkdiscard) and a check that
# the rest of the disk is still readable. vblk.fio=bs:depth,bs:depth,... vblk.fiosize=MiB per job.
. /workloads/lib.sh
jobs=$(param fio 512:1,4k:32,64k:8,1m:4)
size=$(param fiosize 8)
numjobs=$(param jobs 1)
off=0
fail=0
echo "VBLK-RESULT mq $(ls /sys/block/vda/mq | wc -l)"
for j in $(echo "$jobs" | tr ',' ' '); do
  bs=${j%%:*}
  qd=${j##*:}
  if fio --name="v$bs-$qd" --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth="$qd" \
      --bs="$bs" --rw=randwrite --offset="${off}M" --size="${size}M" --verify=crc32c \
      --verify_fatal=1 --do_verify=1 --randrepeat=0 --numjobs="$numjobs" --offset_increment="${size}M" \
      --output=/tmp/fio.log >/dev/null 2>&1; then
    echo "VBLK-RESULT fio bs=$bs qd=$qd ok"
  else
    tail -20 /tmp/fio.log
    echo "VBLK-RESULT fio bs=$bs qd=$qd FAIL"
    fail=1
  fi
  off=$((off + size * numjobs))
done
# Discard the first job's region (when the disk offers discard), then the whole verified area
# must still read back.
if [ "$(cat /sys/block/vda/queue/discard_max_bytes)" = 0 ]; then
  echo "VBLK-RESULT discard unsupported"
elif blkdiscard -o 0 -l $((size * 1024 * 1024)) /dev/vda 2>/tmp/discard.log; then
  echo "VBLK-RESULT discard ok"
else
  cat /tmp/discard.log
  echo "VBLK-RESULT discard FAIL"
  fail=1
fi
if dd if=/dev/vda of=/dev/null bs=1M count="$off" iflag=direct 2>/dev/null; then echo "VBLK-RESULT readback ok"; else echo "VBLK-RESULT readback FAIL"; fail=1; fi
exit $fail
