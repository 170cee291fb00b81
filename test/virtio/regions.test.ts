import { expect } from 'chai';
import { GuestMemory } from '../../src/memory/guest-memory';
import { createMemoryDisk } from '../../src/disk/memory-disk';
import { VirtioBlkDevice } from '../../src/virtio/blk';
import { MockBlkDriver, snapshotMemory, changedOutside } from '../../src/virtio/mock-driver';
import type { MockVirtqueue } from '../../src/virtio/mock-driver';
import { VIRTQ_DESC_F } from '../../src/virtio/chain';
import { VIRTIO_BLK_T, VIRTIO_BLK_S } from '../../src/virtio/blk-config';
import { pattern, rawChain, blkHeader } from './helpers';

/** Requests whose buffers cross from one guest memory region into the next (vhost-user maps RAM as several regions). */
describe('virtio-blk over several guest memory regions', () => {
  const A = 0x10_0000;
  const SIZE = 0x10_0000;
  function make(): { mem: GuestMemory; drv: MockBlkDriver; disk: ReturnType<typeof createMemoryDisk> } {
    const mem = new GuestMemory([
      { guestAddr: A, buffer: Buffer.alloc(SIZE) },
      { guestAddr: A + SIZE, buffer: Buffer.alloc(SIZE) },
      { guestAddr: 0x1000_0000, buffer: Buffer.alloc(SIZE) }, // not adjacent
    ]);
    const disk = createMemoryDisk({ size: 1 << 20 });
    const dev = new VirtioBlkDevice(disk, { queueSize: 16 });
    const drv = new MockBlkDriver(dev, mem);
    drv.start();
    return { mem, drv, disk };
  }

  /** A direct chain over `descs`, linked in order. */
  function chain(q: MockVirtqueue, descs: { addr: number; len: number; flags: number }[]): number {
    return rawChain(q, descs.map((d, i) => (i < descs.length - 1 ? { ...d, flags: d.flags | VIRTQ_DESC_F.NEXT, next: i + 1 } : d)));
  }

  it('an OUT whose data straddles two adjacent regions writes every byte', async () => {
    const { mem, drv, disk } = make();
    const q = drv.queues[0] as MockVirtqueue;
    const data = pattern(4096, 11);
    const dataAddr = A + SIZE - 1000;
    mem.writeFrom(dataAddr, data);
    mem.writeFrom(A + 0x80000, blkHeader(VIRTIO_BLK_T.OUT, 8));
    const st = A + 0x80100;
    q.publish(chain(q, [
      { addr: A + 0x80000, len: 16, flags: 0 },
      { addr: dataAddr, len: 4096, flags: 0 },
      { addr: st, len: 1, flags: VIRTQ_DESC_F.WRITE },
    ]));
    drv.kick(0);
    await q.waitInterrupt();
    expect(q.reap()[0]?.len).to.equal(1);
    expect(mem.readU8(st)).to.equal(VIRTIO_BLK_S.OK);
    expect(disk.priv.data.subarray(4096, 8192).equals(data)).to.equal(true);
  });

  it('an IN whose data straddles two regions fills both parts and nothing else', async () => {
    const { mem, drv, disk } = make();
    const q = drv.queues[0] as MockVirtqueue;
    disk.priv.data.set(pattern(2048, 12), 0);
    mem.writeFrom(A + 0x80000, blkHeader(VIRTIO_BLK_T.IN, 0));
    const dataAddr = A + SIZE - 300; // 300 bytes in region 0, the rest in region 1
    const st = 0x1000_0010; // status in the far region
    const snap = snapshotMemory(mem);
    q.publish(chain(q, [
      { addr: A + 0x80000, len: 16, flags: 0 },
      { addr: dataAddr, len: 2048, flags: VIRTQ_DESC_F.WRITE },
      { addr: st, len: 1, flags: VIRTQ_DESC_F.WRITE },
    ]));
    drv.kick(0);
    await q.waitInterrupt();
    expect(q.reap()[0]?.len).to.equal(2049);
    expect(mem.readU8(st)).to.equal(VIRTIO_BLK_S.OK);
    expect(mem.read(dataAddr, 2048).equals(pattern(2048, 12))).to.equal(true);
    const usedRing = { addr: q.usedRing, len: 4096 };
    expect(changedOutside(mem, snap, [usedRing, { addr: q.availRing, len: 64 }, { addr: q.descTable, len: 256 }, { addr: dataAddr, len: 2048 }, { addr: st, len: 1 }])).to.deep.equal([]);
  });

  it('a buffer running from a region into a hole is refused (used length 0)', async () => {
    const { mem, drv } = make();
    const q = drv.queues[0] as MockVirtqueue;
    mem.writeFrom(A + 0x80000, blkHeader(VIRTIO_BLK_T.IN, 0));
    const head = chain(q, [
      { addr: A + 0x80000, len: 16, flags: 0 },
      { addr: A + 2 * SIZE - 100, len: 512, flags: VIRTQ_DESC_F.WRITE },
      { addr: A + 0x80100, len: 1, flags: VIRTQ_DESC_F.WRITE },
    ]);
    q.publish(head);
    drv.kick(0);
    await q.waitInterrupt();
    expect(q.reap()).to.deep.equal([{ id: head, len: 0 }]);
  });
});
