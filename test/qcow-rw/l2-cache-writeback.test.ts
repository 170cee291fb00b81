/**
 * L2Cache write-back under concurrency: a table whose write-back is in flight stays in the cache
 * (dirty, not evictable) until the write lands, a reload of its offset waits for that write, and
 * two write-backs of one table never overlap. The "disk" here is a Map of table bytes whose writes
 * land only when the test releases them, so the races are deterministic.
 */
import { expect } from 'chai';
import { L2Cache, L2Table } from '../../src/disk/qcow/l2-cache';

const TB = 64; // bytes per table (8 entries)

/** A fake table store whose writes are deferred until `release()`. */
class SlowDisk {
  readonly bytes = new Map<number, Buffer>();
  readonly pending: { off: number; data: Buffer; done: () => void }[] = [];
  /** Offsets of writes that landed, in landing order. */
  readonly landed: number[] = [];
  /** Write-backs in flight at the same time, per offset (max seen). */
  maxOverlap = 0;
  readonly #inflight = new Map<number, number>();

  constructor(offsets: number[]) {
    for (const o of offsets) this.bytes.set(o, Buffer.alloc(TB));
  }

  read = async (buf: Uint8Array, off: number): Promise<number> => {
    const b = this.bytes.get(off) ?? Buffer.alloc(TB);
    buf.set(b);
    return TB;
  };

  writeBack = (t: L2Table, data: Buffer): Promise<void> => {
    const n = (this.#inflight.get(t.offset) ?? 0) + 1;
    this.#inflight.set(t.offset, n);
    this.maxOverlap = Math.max(this.maxOverlap, n);
    return new Promise<void>((resolve) => {
      this.pending.push({
        off: t.offset,
        data,
        done: () => {
          this.bytes.set(t.offset, Buffer.from(data));
          this.landed.push(t.offset);
          this.#inflight.set(t.offset, (this.#inflight.get(t.offset) ?? 1) - 1);
          resolve();
        },
      });
    });
  };

  /** Lands the oldest pending write. */
  release(): void {
    const p = this.pending.shift();
    if (!p) throw new Error('no pending write');
    p.done();
  }
}

/** Lets every queued promise continuation run. */
function settle(): Promise<void> {
  return new Promise((r) => setImmediate(r));
}

describe('L2Cache write-back races', () => {
  it('keeps a table whose eviction write-back is in flight, so a concurrent get never reloads the stale copy', async () => {
    const disk = new SlowDisk([0x1000, 0x2000, 0x3000, 0x4000]);
    const c = new L2Cache({ capacity: 2, tableBytes: TB, read: disk.read, writeBack: disk.writeBack });
    const a = await c.get(0x1000);
    a.setEntry(0, 7n);
    c.markDirty(a);
    await c.get(0x2000);
    // Loading 0x3000 evicts a (least recently used, dirty): its write-back starts and hangs.
    const p3 = c.get(0x3000);
    await settle();
    expect(disk.pending.map((p) => p.off)).to.deep.equal([0x1000]);
    // A second load needs room too: it must not drop a while a's write has not landed.
    const p4 = c.get(0x4000);
    await settle();
    const again = c.get(0x1000);
    await settle();
    disk.release();
    const t = await again;
    await Promise.all([p3, p4]);
    expect(t.entry(0)).to.equal(7n);
  });

  it('a load of an offset whose write-back is still in flight waits for the write to land', async () => {
    const disk = new SlowDisk([0x1000, 0x2000]);
    const c = new L2Cache({ capacity: 4, tableBytes: TB, read: disk.read, writeBack: disk.writeBack });
    const a = await c.get(0x1000);
    a.setEntry(1, 9n);
    c.markDirty(a);
    const f = c.flush();
    await settle();
    c.forget(0x1000); // e.g. dropped by a writer while the write-back runs
    const reload = c.get(0x1000);
    await settle();
    disk.release();
    await f;
    expect((await reload).entry(1)).to.equal(9n);
  });

  it('a table changed during its write-back stays dirty and the next write-back carries the change', async () => {
    const disk = new SlowDisk([0x1000]);
    const c = new L2Cache({ capacity: 4, tableBytes: TB, read: disk.read, writeBack: disk.writeBack });
    const a = await c.get(0x1000);
    a.setEntry(0, 1n);
    c.markDirty(a);
    const f1 = c.flush();
    await settle();
    a.setEntry(0, 2n);
    c.markDirty(a);
    disk.release();
    await f1;
    expect(a.dirty).to.equal(true);
    const f2 = c.flush();
    await settle();
    disk.release();
    await f2;
    expect(a.dirty).to.equal(false);
    expect(disk.bytes.get(0x1000)?.readBigUInt64BE(0)).to.equal(2n);
  });

  it('never has two write-backs of one table in flight; the newest bytes land last', async () => {
    const disk = new SlowDisk([0x1000]);
    const c = new L2Cache({ capacity: 4, tableBytes: TB, read: disk.read, writeBack: disk.writeBack });
    const a = await c.get(0x1000);
    a.setEntry(0, 1n);
    c.markDirty(a);
    const f1 = c.flush();
    await settle();
    a.setEntry(0, 2n);
    c.markDirty(a);
    const f2 = c.flush(); // must wait for f1's write, then write version 2
    await settle();
    expect(disk.pending).to.have.length(1);
    disk.release();
    await settle();
    expect(disk.pending).to.have.length(1);
    disk.release();
    await Promise.all([f1, f2]);
    expect(disk.maxOverlap).to.equal(1);
    expect(disk.bytes.get(0x1000)?.readBigUInt64BE(0)).to.equal(2n);
  });

  it('never evicts a pinned table; the cache grows past capacity only while everything is pinned', async () => {
    const disk = new SlowDisk([0x1000, 0x2000]);
    const c = new L2Cache({ capacity: 1, tableBytes: TB, read: disk.read, writeBack: disk.writeBack });
    const a = await c.get(0x1000);
    c.pin(a);
    const b = await c.get(0x2000);
    expect(c.peek(0x1000)).to.equal(a);
    expect(c.size).to.equal(2);
    c.unpin(a);
    await c.get(0x3000);
    expect(c.size).to.equal(1);
    expect(c.peek(0x1000)).to.equal(undefined);
    expect(c.peek(0x2000)).to.equal(undefined);
    expect(c.peek(0x3000)).to.not.equal(undefined);
    expect(b.pins).to.equal(0);
    expect(() => c.unpin(a)).to.throw(RangeError);
  });
});
