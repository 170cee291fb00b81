import { expect } from 'chai';
import { GuestMemory } from '../../src/memory/guest-memory';
import { GuestAllocator, MockVirtqueue, snapshotMemory, changedOutside, encodeDwzSegment } from '../../src/virtio/mock-driver';
import { SplitQueue } from '../../src/virtio/queue';
import { VIRTQ_DESC_F } from '../../src/virtio/chain';
import { setup } from './helpers';
import { VIRTIO_BLK_T } from '../../src/virtio/blk-config';

describe('mock driver (simulated guest side)', () => {
  const BASE = 0x8000;
  function mem(): GuestMemory {
    return new GuestMemory([{ guestAddr: BASE, buffer: Buffer.alloc(1 << 18) }]);
  }

  it('GuestAllocator hands out aligned, non-overlapping ranges and refuses to overflow', () => {
    const a = new GuestAllocator(0x1001, 100);
    const x = a.alloc(10);
    const y = a.alloc(10, 64);
    expect(x % 16).to.equal(0);
    expect(y % 64).to.equal(0);
    expect(y).to.be.at.least(x + 10);
    expect(() => a.alloc(1000)).to.throw(RangeError);
    a.reset();
    expect(a.used).to.equal(0);
  });

  it('lays out the rings with the alignment the spec requires and zeroes them', () => {
    const m = mem();
    m.slice(BASE, 0x3000).fill(0xff);
    const q = new MockVirtqueue(m, 16, BASE);
    expect([q.descTable % 16, q.availRing % 2, q.usedRing % 4]).to.deep.equal([0, 0, 0]);
    expect(q.usedIdx).to.equal(0);
    expect(q.freeDescriptors).to.equal(16);
    expect(MockVirtqueue.footprint(16)).to.be.at.least(16 * 16 + 6 + 2 * 16 + 6 + 8 * 16);
  });

  it('builds direct chains the device-side queue reads back exactly', () => {
    const m = mem();
    const drv = new MockVirtqueue(m, 8, BASE);
    const q = new SplitQueue({ memory: m, size: 8, descTable: drv.descTable, availRing: drv.availRing, usedRing: drv.usedRing });
    const head = drv.buildChain([
      { addr: BASE + 0x10000, len: 3, writable: false },
      { addr: BASE + 0x10010, len: 5, writable: true },
    ]);
    drv.publish(head);
    expect(drv.freeDescriptors).to.equal(6);
    const c = q.pop();
    expect([c?.head, c?.readableLength, c?.writableLength]).to.deep.equal([head, 3, 5]);
    q.addUsed(head, 5);
    q.publishUsed();
    expect(drv.reap()).to.deep.equal([{ id: head, len: 5 }]);
    expect(drv.freeDescriptors).to.equal(8); // descriptors freed when reaped
  });

  it('builds indirect chains that take one ring descriptor', () => {
    const m = mem();
    const drv = new MockVirtqueue(m, 8, BASE);
    const head = drv.buildChain(
      [
        { addr: BASE + 0x10000, len: 16, writable: false },
        { addr: BASE + 0x10100, len: 1, writable: true },
      ],
      { indirect: { table: BASE + 0x20000 } },
    );
    expect(drv.freeDescriptors).to.equal(7);
    expect(m.readU16(drv.descTable + 16 * head + 12)).to.equal(VIRTQ_DESC_F.INDIRECT);
    expect(m.readU32(drv.descTable + 16 * head + 8)).to.equal(32);
  });

  it('MockBlkDriver splits a request at the given cut points', () => {
    const { drv } = setup();
    const q = drv.queues[0] as MockVirtqueue;
    const r = drv.submit(0, { type: VIRTIO_BLK_T.OUT, sector: 0, data: Buffer.alloc(1024) }, { readableCuts: [4, 16, 700], writableCuts: [] });
    // readable: 4 + 12 + 684 + 340 bytes, writable: the status byte
    const lens: number[] = [];
    let d = r.head;
    for (;;) {
      const off = q.descTable + 16 * d;
      lens.push(drv.memory.readU32(off + 8));
      if ((drv.memory.readU16(off + 12) & VIRTQ_DESC_F.NEXT) === 0) break;
      d = drv.memory.readU16(off + 14);
    }
    expect(lens).to.deep.equal([4, 12, 684, 340, 1]);
  });

  it('snapshotMemory / changedOutside report changed bytes outside the allowed ranges only', () => {
    const m = mem();
    const snap = snapshotMemory(m);
    m.writeU8(BASE + 10, 1);
    m.writeU8(BASE + 20, 1);
    expect(changedOutside(m, snap, [{ addr: BASE + 10, len: 1 }])).to.deep.equal([BASE + 20]);
    expect(changedOutside(m, snap, [{ addr: BASE, len: 32 }])).to.deep.equal([]);
  });

  it('encodeDwzSegment lays out sector, count and flags little-endian', () => {
    const b = encodeDwzSegment(0x0102030405n, 7, 1);
    expect(b.readBigUInt64LE(0)).to.equal(0x0102030405n);
    expect([b.readUInt32LE(8), b.readUInt32LE(12), b.length]).to.deep.equal([7, 1, 16]);
  });
});
