#!/bin/sh
# Driver reset: write a pattern, unload virtio_blk (the front-end stops the rings: GET_VRING_BASE),
# load it again (rings restarted from the saved base), read the pattern back. Twice.
. /workloads/lib.sh
dd if=/dev/urandom of=/tmp/pat bs=64k count=16 2>/dev/null
want=$(md5sum < /tmp/pat | cut -d' ' -f1)
dd if=/tmp/pat of=/dev/vda bs=64k oflag=direct 2>/dev/null || { echo "VBLK-RESULT write FAIL"; exit 1; }
for round in 1 2; do
  rmmod virtio_blk || { echo "VBLK-RESULT rmmod FAIL"; exit 1; }
  insmod /lib/modules/virtio_blk.ko || { echo "VBLK-RESULT insmod FAIL"; exit 1; }
  i=0
  while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  got=$(dd if=/dev/vda bs=64k count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  if [ "$got" = "$want" ]; then echo "VBLK-RESULT reload $round ok"; else echo "VBLK-RESULT reload $round FAIL"; exit 1; fi
done
