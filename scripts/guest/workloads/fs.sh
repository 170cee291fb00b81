#!/bin/sh
# ext4 round trip: mkfs, mount, write files, md5, unmount, remount, md5 again, fstrim, fsck.
. /workloads/lib.sh
set -e
files=$(param files 8)
mb=$(param filemb 2)
mkfs.ext4 -q -F /dev/vda
echo "VBLK-RESULT mkfs ok"
mount -t ext4 /dev/vda /mnt
i=0
while [ $i -lt "$files" ]; do
  dd if=/dev/urandom of=/mnt/f$i bs=1M count="$mb" 2>/dev/null
  i=$((i + 1))
done
mkdir -p /mnt/dir/sub && echo "hello from the vblk guest" > /mnt/dir/sub/hello.txt
(cd /mnt && md5sum f* dir/sub/hello.txt) > /tmp/sums
sync
umount /mnt
mount -t ext4 /dev/vda /mnt
if (cd /mnt && md5sum -c /tmp/sums >/dev/null); then echo "VBLK-RESULT md5 ok"; else echo "VBLK-RESULT md5 FAIL"; exit 1; fi
while read -r sum name; do echo "VBLK-MD5 $name $sum"; done < /tmp/sums
fstrim -v /mnt >/dev/null 2>&1 && echo "VBLK-RESULT fstrim ok" || echo "VBLK-RESULT fstrim unsupported"
umount /mnt
if fsck.ext4 -fn /dev/vda >/tmp/fsck.log 2>&1; then echo "VBLK-RESULT fsck ok"; else cat /tmp/fsck.log; echo "VBLK-RESULT fsck FAIL"; exit 1; fi
