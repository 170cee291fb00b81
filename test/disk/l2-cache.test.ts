import { expect } from 'chai';
import { L2Cache, L2Table } from '../../src/disk/qcow/l2-cache';
import { openDiskImage } from '../../src/disk/open';
import type { Qcow2State } from '../../src/disk/qcow/qcow2';
import { requireQemu, useTempDir, createImage, writePatterns, qemuToRaw } from '../helpers/qemu';

function fakeSource(tables: number, bytes: number): { reads: number[]; read: (b: Uint8Array, o: number) => Promise<number> } {
  const reads: number[] = [];
  return {
    reads,
    read: async (b, o) => {
      reads.push(o);
      const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
      for (let i = 0; i < bytes / 8; i++) dv.setBigUint64(i * 8, BigInt(o) + BigInt(i));
      void tables;
      return bytes;
    },
  };
}

describe('L2Cache', () => {
  it('decodes big-endian entries into words and back', () => {
    const b = Buffer.alloc(16);
    b.writeBigUInt64BE(0x8000000000050000n, 0);
    b.writeBigUInt64BE(0x4000000000050000n | 0x1234n, 8);
    const t = L2Table.decode(0x40000, b, 2);
    expect(t.length).to.equal(2);
    expect(t.entry(0)).to.equal(0x8000000000050000n);
    expect(t.entry(1)).to.equal(0x4000000000051234n);
    t.setEntry(0, 0x8000000000060001n);
    expect(t.encode().readBigUInt64BE(0)).to.equal(0x8000000000060001n);
  });

  it('is bounded and evicts the least recently used table', async () => {
    const src = fakeSource(8, 64);
    const c = new L2Cache({ capacity: 3, tableBytes: 64, read: src.read });
    await c.get(0x1000);
    await c.get(0x2000);
    await c.get(0x3000);
    c.peek(0x1000); // 0x2000 is now the LRU
    await c.get(0x4000);
    expect(c.size).to.equal(3);
    expect(c.peek(0x2000)).to.equal(undefined);
    expect(c.peek(0x1000)).to.not.equal(undefined);
    expect(src.reads).to.deep.equal([0x1000, 0x2000, 0x3000, 0x4000]);
  });

  it('issues one read for many concurrent requests of the same table', async () => {
    const src = fakeSource(1, 64);
    const c = new L2Cache({ capacity: 4, tableBytes: 64, read: src.read });
    const ts = await Promise.all(Array.from({ length: 50 }, () => c.get(0x5000)));
    expect(src.reads).to.deep.equal([0x5000]);
    expect(new Set(ts).size).to.equal(1);
  });

  it('writes a dirty table back before evicting it', async () => {
    const src = fakeSource(4, 64);
    const written: number[] = [];
    const c = new L2Cache({ capacity: 1, tableBytes: 64, read: src.read, writeBack: async (t) => void written.push(t.offset) });
    const t = await c.get(0x1000);
    t.setEntry(0, 7n);
    c.markDirty(t);
    await c.get(0x2000);
    expect(written).to.deep.equal([0x1000]);
    expect(c.size).to.equal(1);
  });

  it('flush writes every dirty table once', async () => {
    const src = fakeSource(4, 64);
    const written: number[] = [];
    const c = new L2Cache({ capacity: 4, tableBytes: 64, read: src.read, writeBack: async (t) => void written.push(t.offset) });
    const a = await c.get(0x2000);
    const b = await c.get(0x1000);
    c.markDirty(a);
    c.markDirty(b);
    await c.flush();
    await c.flush();
    expect(written).to.deep.equal([0x1000, 0x2000]);
  });

  it('a short read of a table (past EOF) is an error naming it', async () => {
    const c = new L2Cache({ capacity: 4, tableBytes: 64, read: async () => 10 });
    let msg = '';
    await c.get(0x9000).catch((e: Error) => (msg = e.message));
    expect(msg).to.equal('Cannot read L2 table at 0x9000: short read (10 of 64 bytes, past the end of the file)');
  });
});

describe('qcow2 read path: caching and concurrency', function () {
  const tmp = useTempDir();
  let img = '';
  let ref: Buffer = Buffer.alloc(0);
  before(function () {
    requireQemu(this);
    // 4 KiB clusters: one L2 table covers 2 MiB, so 16 MiB needs 8 tables.
    img = createImage(tmp.file('c.qcow2'), '16M', { options: { cluster_size: '4k' } });
    const w = [];
    for (let i = 0; i < 64; i++) w.push({ byte: (i * 37 + 1) & 0xff, offset: i * 256 * 1024 + (i % 7) * 4096, length: 8192 + (i % 3) * 512 });
    writePatterns(img, w);
    ref = qemuToRaw(img, tmp.file('c.raw'));
  });

  it('does not re-read L2 tables: a second full pass is served from the cache', async () => {
    const d = await openDiskImage(img, { readonly: true });
    const s = d.priv as Qcow2State;
    const buf = new Uint8Array(1 << 20);
    for (let off = 0; off < d.size; off += buf.length) await d.readSector(off / 512, buf);
    const loads = s.l2Cache.loads;
    expect(loads).to.equal(8);
    for (let off = 0; off < d.size; off += buf.length) await d.readSector(off / 512, buf);
    expect(s.l2Cache.loads).to.equal(loads);
    await d.close();
  });

  it('stays within its configured bound (l2CacheBytes)', async () => {
    const d = await openDiskImage(img, { readonly: true, l2CacheBytes: 4 * 4096 });
    const s = d.priv as Qcow2State;
    expect(s.l2Cache.capacity).to.equal(4);
    const buf = new Uint8Array(1 << 20);
    for (let off = 0; off < d.size; off += buf.length) {
      await d.readSector(off / 512, buf);
      expect(Buffer.from(buf).equals(ref.subarray(off, off + buf.length))).to.equal(true);
      expect(s.l2Cache.size).to.be.at.most(4);
    }
    await d.close();
  });

  it('serves 512 concurrent reads of random ranges correctly', async () => {
    const d = await openDiskImage(img, { readonly: true, l2CacheBytes: 2 * 4096 });
    let seed = 12345;
    const rnd = (n: number): number => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed % n;
    };
    const reqs = Array.from({ length: 512 }, () => {
      const sectors = 1 + rnd(64);
      const sector = rnd(d.sectors - sectors);
      return { sector, buf: new Uint8Array(sectors * 512) };
    });
    await Promise.all(reqs.map((r) => d.readSector(r.sector, r.buf)));
    for (const r of reqs) {
      const exp = ref.subarray(r.sector * 512, r.sector * 512 + r.buf.length);
      expect(Buffer.from(r.buf).equals(exp), `sector ${r.sector}+${r.buf.length}`).to.equal(true);
    }
    await d.close();
  });

  it('coalesces contiguous host clusters of one request into one read', async () => {
    // A fully written image: guest-contiguous clusters are host-contiguous.
    const f = createImage(tmp.file('seq.qcow2'), '4M', { options: { cluster_size: '4k' } });
    writePatterns(f, [{ byte: 0x31, offset: 0, length: 4 << 20 }]);
    const d = await openDiskImage(f, { readonly: true });
    const s = d.priv as Qcow2State;
    let reads = 0;
    const orig = s.file.read.bind(s.file);
    s.file.read = (b: Uint8Array, o: number) => {
      reads++;
      return orig(b, o);
    };
    await d.readSector(0, new Uint8Array(4096)); // loads the L2 table
    reads = 0;
    const buf = new Uint8Array(256 * 1024);
    await d.readSector(0, buf);
    expect(reads).to.equal(1);
    expect(buf.every((b) => b === 0x31)).to.equal(true);
    await d.close();
  });
});
