/**
 * RefcountManager's block cache under concurrency: a block whose write is in flight (flush from an
 * L2 eviction, outside the metadata lock) must not be evicted and reloaded before the write lands,
 * or the reload brings back old counts and a later increment is lost (a cluster with too low a
 * refcount: reused while still referenced).
 */
import { expect } from 'chai';
import type { ImageFile } from '../../src/disk/file';
import { RefcountManager, getRefcount } from '../../src/disk/qcow/refcount';

const BITS = 20; // 1 MiB clusters: the block cache holds its minimum of 16 blocks
const CS = 2 ** BITS;
const ORDER = 4;
const BLOCKS = 17;

/** An in-memory file of whole-cluster records; writes at `slowAt` land only on `release()`. */
class MemFile implements ImageFile {
  readonly path = 'mem';
  readonly writable = true;
  readonly data = new Map<number, Uint8Array>();
  slowAt = -1;
  readonly #held: (() => void)[] = [];

  async read(buf: Uint8Array, pos: number): Promise<number> {
    const d = this.data.get(pos);
    if (d) buf.set(d.subarray(0, buf.length));
    else buf.fill(0);
    return buf.length;
  }

  write(buf: Uint8Array, pos: number): Promise<void> {
    const copy = Uint8Array.from(buf);
    if (pos !== this.slowAt) {
      this.data.set(pos, copy);
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      this.#held.push(() => {
        this.data.set(pos, copy);
        resolve();
      });
    });
  }

  release(): void {
    const f = this.#held.shift();
    if (!f) throw new Error('no held write');
    f();
  }

  get held(): number {
    return this.#held.length;
  }

  async sync(): Promise<void> {}
  async size(): Promise<number> {
    return (BLOCKS + 2) * CS;
  }
  async truncate(): Promise<void> {}
  async close(): Promise<void> {}
}

function settle(): Promise<void> {
  return new Promise((r) => setImmediate(r));
}

describe('RefcountManager block cache', () => {
  it('never evicts a block whose write is in flight, so an increment made meanwhile is not lost', async () => {
    const file = new MemFile();
    // Refcount table at cluster 1, blocks 0..16 at clusters 2..18.
    const table = new Uint8Array(CS);
    const dv = new DataView(table.buffer);
    for (let r = 0; r < BLOCKS; r++) dv.setBigUint64(r * 8, BigInt((2 + r) * CS));
    file.data.set(CS, table);
    const rc = await RefcountManager.load(file, { clusterBits: BITS, refcountOrder: ORDER, tableOffset: CS, tableClusters: 1 });
    const per = rc.rbEntries;
    const c0 = 5; // a cluster described by block 0
    for (let r = 0; r < 16; r++) await rc.adjust(r * per + 5, 1); // 16 dirty blocks: the cache is full
    file.slowAt = 2 * CS; // block 0's write hangs
    const flushing = rc.flush();
    await settle();
    expect(file.held).to.equal(1);
    // Block 16 needs room; then block 0 is used again while its write has not landed.
    await rc.adjust(16 * per + 5, 1);
    const inc = rc.adjust(c0, 1);
    await settle();
    file.slowAt = -1;
    file.release();
    expect(await inc).to.equal(2);
    await flushing;
    await rc.flush();
    const onDisk = file.data.get(2 * CS);
    expect(onDisk && getRefcount(onDisk, c0, ORDER)).to.equal(2);
  });

  it('flush waits for a block write that a concurrent flush already issued (the caller syncs after it)', async () => {
    const file = new MemFile();
    const table = new Uint8Array(CS);
    new DataView(table.buffer).setBigUint64(0, BigInt(2 * CS));
    file.data.set(CS, table);
    const rc = await RefcountManager.load(file, { clusterBits: BITS, refcountOrder: ORDER, tableOffset: CS, tableClusters: 1 });
    await rc.adjust(7, 1);
    file.slowAt = 2 * CS;
    const first = rc.flush(); // marks the block clean, its write hangs
    await settle();
    let secondDone = false;
    const second = rc.flush().then(() => (secondDone = true));
    await settle();
    expect(secondDone, 'second flush returned before the block reached the file').to.equal(false);
    file.slowAt = -1;
    file.release();
    await Promise.all([first, second]);
    expect(secondDone).to.equal(true);
    const onDisk = file.data.get(2 * CS);
    expect(onDisk && getRefcount(onDisk, 7, ORDER)).to.equal(1);
  });
});
