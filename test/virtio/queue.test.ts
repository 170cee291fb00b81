import { expect } from 'chai';
import fc from 'fast-check';
import { GuestMemory } from '../../src/memory/guest-memory';
import { SplitQueue, needsEvent, splitRingSizes } from '../../src/virtio/queue';
import { MockVirtqueue } from '../../src/virtio/mock-driver';
import { VIRTQ_DESC_F } from '../../src/virtio/chain';
import { expectVblkError as expectCode } from './helpers';

const BASE = 0x4000;

function mem(size = 1 << 20): GuestMemory {
  return new GuestMemory([{ guestAddr: BASE, buffer: Buffer.alloc(size) }]);
}

function pair(o: { size?: number; eventIdx?: boolean; indirect?: boolean; nextAvail?: number } = {}): { m: GuestMemory; drv: MockVirtqueue; q: SplitQueue } {
  const m = mem();
  const drv = new MockVirtqueue(m, o.size ?? 8, BASE);
  const q = new SplitQueue({
    memory: m,
    size: drv.size,
    descTable: drv.descTable,
    availRing: drv.availRing,
    usedRing: drv.usedRing,
    eventIdx: o.eventIdx ?? false,
    indirect: o.indirect ?? true,
    ...(o.nextAvail !== undefined ? { nextAvail: o.nextAvail } : {}),
  });
  return { m, drv, q };
}

describe('SplitQueue setup', () => {
  const m = mem();
  const ok = { memory: m, descTable: BASE, availRing: BASE + 0x1000, usedRing: BASE + 0x2000 };

  it('accepts power-of-two sizes up to the maximum', () => {
    expect(new SplitQueue({ ...ok, size: 1 }).size).to.equal(1);
    expect(new SplitQueue({ ...ok, size: 256 }).size).to.equal(256);
  });

  it('rejects sizes that are zero, not a power of two, or above the maximum', () => {
    expectCode(() => new SplitQueue({ ...ok, size: 0 }), 'E_VIRTIO_RING');
    expectCode(() => new SplitQueue({ ...ok, size: 24 }), 'E_VIRTIO_RING');
    expectCode(() => new SplitQueue({ ...ok, size: 512, maxSize: 256 }), 'E_VIRTIO_RING');
    expectCode(() => new SplitQueue({ ...ok, size: 65536 }), 'E_VIRTIO_RING');
  });

  it('rejects misaligned rings (desc 16, avail 2, used 4)', () => {
    expectCode(() => new SplitQueue({ ...ok, size: 8, descTable: BASE + 8 }), 'E_VIRTIO_RING');
    expectCode(() => new SplitQueue({ ...ok, size: 8, availRing: BASE + 0x1001 }), 'E_VIRTIO_RING');
    expectCode(() => new SplitQueue({ ...ok, size: 8, usedRing: BASE + 0x2002 }), 'E_VIRTIO_RING');
  });

  it('rejects rings that are not entirely inside guest memory', () => {
    const end = BASE + (1 << 20);
    expectCode(() => new SplitQueue({ ...ok, size: 256, descTable: end - 16 * 128 }), 'E_VIRTIO_RING');
    expectCode(() => new SplitQueue({ ...ok, size: 8, usedRing: end - 8 }), 'E_VIRTIO_RING');
    expectCode(() => new SplitQueue({ ...ok, size: 8, availRing: 0 }), 'E_VIRTIO_RING');
  });

  it('reports the byte sizes of the ring parts', () => {
    expect(splitRingSizes(256)).to.deep.equal({ desc: 4096, avail: 518, used: 2054 });
  });
});

describe('SplitQueue pop', () => {
  it('returns null on an empty ring', () => {
    const { q } = pair();
    expect(q.pop()).to.equal(null);
  });

  it('splits a chain into readable and writable views of guest memory', () => {
    const { m, drv, q } = pair();
    m.writeFrom(BASE + 0x10000, Buffer.from('hello'));
    const head = drv.buildChain([
      { addr: BASE + 0x10000, len: 5, writable: false },
      { addr: BASE + 0x20000, len: 7, writable: true },
      { addr: BASE + 0x30000, len: 1, writable: true },
    ]);
    drv.publish(head);
    const c = q.pop();
    expect(c?.error).to.equal(undefined);
    expect(c?.head).to.equal(head);
    expect(c?.readable.map((b) => b.toString())).to.deep.equal(['hello']);
    expect(c?.writable.map((b) => b.length)).to.deep.equal([7, 1]);
    expect([c?.readableLength, c?.writableLength, c?.descriptors]).to.deep.equal([5, 8, 3]);
    c?.writable[0]?.fill(0x42);
    expect(m.readU8(BASE + 0x20000)).to.equal(0x42);
    expect(q.inFlight).to.equal(1);
  });

  it('refuses INDIRECT when the feature was not negotiated', () => {
    const { drv, q } = pair({ indirect: false });
    const head = drv.buildChain([{ addr: BASE + 0x10000, len: 16, writable: false }], { indirect: { table: BASE + 0x40000 } });
    drv.publish(head);
    expect(q.pop()?.error?.code).to.equal('E_VIRTIO_CHAIN');
  });

  it('marks the queue broken when avail idx runs more than size ahead', () => {
    const { drv, q } = pair();
    drv.setAvailIdx(9);
    expectCode(() => q.pop(), 'E_VIRTIO_RING');
    expect(q.broken).to.equal(true);
    expect(q.pop()).to.equal(null);
  });

  it('handles avail and used indices wrapping at 2^16', () => {
    const { m, drv, q } = pair({ nextAvail: 0xffff });
    drv.setAvailIdx(0xffff);
    const h = drv.buildChain([{ addr: BASE + 0x10000, len: 1, writable: true }]);
    // the driver's slot for idx 0xffff is 0xffff % 8 = 7
    m.writeU16(drv.availRing + 4 + 2 * 7, h);
    drv.setAvailIdx(0x10000);
    const c = q.pop();
    expect(c?.head).to.equal(h);
    expect(q.nextAvail).to.equal(0);
    q.addUsed(h, 1);
    q.publishUsed();
    expect(drv.usedIdx).to.equal(0);
  });

  it('completing a head twice is a programmer error', () => {
    const { drv, q } = pair();
    drv.publish(drv.buildChain([{ addr: BASE + 0x10000, len: 1, writable: true }]));
    const c = q.pop();
    q.addUsed(c?.head ?? 0, 1);
    expect(() => q.addUsed(c?.head ?? 0, 1)).to.throw(RangeError);
  });
});

describe('SplitQueue used ring and notifications', () => {
  function popN(drv: MockVirtqueue, q: SplitQueue, n: number): number[] {
    const heads: number[] = [];
    for (let i = 0; i < n; i++) drv.publish(drv.buildChain([{ addr: BASE + 0x10000 + i * 16, len: 1, writable: true }]));
    for (let i = 0; i < n; i++) heads.push(q.pop()?.head ?? -1);
    return heads;
  }

  it('writes entries in completion order and publishes them with one idx update', () => {
    const { drv, q } = pair();
    const heads = popN(drv, q, 3);
    q.addUsed(heads[2] as number, 30);
    q.addUsed(heads[0] as number, 10);
    expect(drv.usedIdx).to.equal(0); // not published yet
    q.addUsed(heads[1] as number, 20);
    expect(q.publishUsed()).to.equal(true);
    expect(drv.usedIdx).to.equal(3);
    expect(drv.reap()).to.deep.equal([
      { id: heads[2], len: 30 },
      { id: heads[0], len: 10 },
      { id: heads[1], len: 20 },
    ]);
    expect(q.publishUsed()).to.equal(false); // nothing new
  });

  it('honours VIRTQ_AVAIL_F_NO_INTERRUPT without EVENT_IDX', () => {
    const { drv, q } = pair();
    const [h] = popN(drv, q, 1);
    drv.setNoInterrupt(true);
    q.addUsed(h as number, 1);
    expect(q.publishUsed()).to.equal(false);
  });

  it('with EVENT_IDX notifies only when used idx passes used_event', () => {
    const { drv, q } = pair({ eventIdx: true });
    const heads = popN(drv, q, 4);
    drv.setUsedEvent(2); // "interrupt me when entry 2 is used"
    q.addUsed(heads[0] as number, 1);
    expect(q.publishUsed()).to.equal(false); // idx 0 -> 1
    q.addUsed(heads[1] as number, 1);
    expect(q.publishUsed()).to.equal(false); // 1 -> 2
    q.addUsed(heads[2] as number, 1);
    expect(q.publishUsed()).to.equal(true); // 2 -> 3 passes 2
    q.addUsed(heads[3] as number, 1);
    expect(q.publishUsed()).to.equal(false); // already passed
  });

  it('enableNotification with EVENT_IDX publishes avail_event = the next avail index', () => {
    const { drv, q } = pair({ eventIdx: true });
    popN(drv, q, 2);
    q.enableNotification();
    expect(drv.availEvent).to.equal(2);
  });

  it('disableNotification without EVENT_IDX sets NO_NOTIFY; enableNotification clears it', () => {
    const { drv, q } = pair();
    q.disableNotification();
    expect(drv.usedFlags).to.equal(1);
    q.enableNotification();
    expect(drv.usedFlags).to.equal(0);
  });

  it('enableNotification reports chains that arrived while kicks were off', () => {
    const { drv, q } = pair();
    q.disableNotification();
    expect(q.enableNotification()).to.equal(false);
    q.disableNotification();
    drv.publish(drv.buildChain([{ addr: BASE + 0x10000, len: 1, writable: true }]));
    expect(q.enableNotification()).to.equal(true);
  });

  it('needsEvent matches the spec formula over the whole u16 space', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 0xffff }), fc.integer({ min: 0, max: 0xffff }), fc.integer({ min: 1, max: 0x7fff }), (ev, old, step) => {
        const now = (old + step) & 0xffff;
        // reference: the event index lies in the window (old, now] walking forward from old
        const dist = (ev - old) & 0xffff;
        const expected = dist < step;
        return needsEvent(ev, now, old) === expected;
      }),
      { numRuns: 2000 },
    );
  });
});

describe('SplitQueue chain rules', () => {
  it('a zero-length descriptor contributes no buffer', () => {
    const { drv, q } = pair();
    const descs = drv.allocDescriptors(2);
    drv.writeDescriptor(descs[0] as number, { addr: 0, len: 0, flags: VIRTQ_DESC_F.NEXT, next: descs[1] as number });
    drv.writeDescriptor(descs[1] as number, { addr: BASE + 0x10000, len: 4, flags: VIRTQ_DESC_F.WRITE, next: 0 });
    drv.publish(descs[0] as number);
    const c = q.pop();
    expect(c?.error).to.equal(undefined);
    expect(c?.readable.length).to.equal(0);
    expect(c?.writableLength).to.equal(4);
  });

  it('a buffer spanning two adjacent regions becomes two views', () => {
    const a = Buffer.alloc(0x10000);
    const b = Buffer.alloc(0x10000);
    const m = new GuestMemory([
      { guestAddr: 0, buffer: a },
      { guestAddr: 0x10000, buffer: b },
    ]);
    const drv = new MockVirtqueue(m, 8, 0x1000);
    const q = new SplitQueue({ memory: m, size: 8, descTable: drv.descTable, availRing: drv.availRing, usedRing: drv.usedRing });
    drv.publish(drv.buildChain([{ addr: 0xff00, len: 0x200, writable: true }]));
    const c = q.pop();
    expect(c?.writable.map((x) => x.length)).to.deep.equal([0x100, 0x100]);
  });
});
