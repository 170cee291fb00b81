#!/bin/sh
# Read-only disk: the kernel reports it read-only, writes fail, reads work.
. /workloads/lib.sh
echo "VBLK-RESULT ro $(cat /sys/block/vda/ro)"
if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; then echo "VBLK-RESULT write accepted"; else echo "VBLK-RESULT write rejected"; fi
echo "VBLK-RESULT read $(dd if=/dev/vda bs=1M count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
