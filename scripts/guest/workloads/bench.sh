#!/bin/sh
# Guest benchmark rows: vblk.bench=name:rw:bs:depth,... each run for vblk.secs seconds.
# Prints VBLK-BENCH name iops kib_per_s.
. /workloads/lib.sh
rows=$(param bench randread-4k-qd1:randread:4k:1,randread-4k-qd32:randread:4k:32,randwrite-4k-qd1:randwrite:4k:1,randwrite-4k-qd32:randwrite:4k:32,read-1m:read:1m:4,write-1m:write:1m:4)
secs=$(param secs 5)
size=$(param benchsize 64)
for r in $(echo "$rows" | tr ',' ' '); do
  name=$(echo "$r" | cut -d: -f1); rw=$(echo "$r" | cut -d: -f2)
  bs=$(echo "$r" | cut -d: -f3); qd=$(echo "$r" | cut -d: -f4)
  out=$(fio --name="$name" --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth="$qd" --bs="$bs" \
    --rw="$rw" --size="${size}M" --time_based --runtime="$secs" --ramp_time=1 --minimal 2>/dev/null)
  # terse v3: field 7/8 read bw KiB/s / iops, 48/49 write bw / iops
  echo "$out" | awk -F';' -v n="$name" '{ print "VBLK-BENCH", n, $8 + $49, $7 + $48 }'
done
