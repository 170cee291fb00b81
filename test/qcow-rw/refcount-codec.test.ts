import { expect } from 'chai';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { getRefcount, setRefcount, maxRefcount, refblockEntries, RefcountManager } from '../../src/disk/qcow/refcount';
import { NodeImageFile } from '../../src/disk/file';

describe('qcow2 refcount block codec', () => {
  for (let order = 0; order <= 6; order++) {
    const bits = 1 << order;
    it(`round-trips every entry of a 512-byte block at refcount_bits=${bits}`, () => {
      const n = refblockEntries(9, order);
      expect(n).to.equal((512 * 8) / bits);
      const block = new Uint8Array(512);
      const max = maxRefcount(order);
      const value = (i: number): number => (i * 2654435761) % (Math.min(max, 1_000_000) + 1);
      for (let i = 0; i < n; i++) setRefcount(block, i, order, value(i));
      for (let i = 0; i < n; i++) expect(getRefcount(block, i, order)).to.equal(value(i));
    });
  }

  it('packs sub-byte widths LSB-first', () => {
    const b1 = new Uint8Array(2);
    setRefcount(b1, 0, 0, 1);
    setRefcount(b1, 3, 0, 1);
    setRefcount(b1, 9, 0, 1);
    expect([...b1]).to.deep.equal([0b00001001, 0b00000010]);
    const b4 = new Uint8Array(1);
    setRefcount(b4, 1, 2, 0xa);
    setRefcount(b4, 0, 2, 0x3);
    expect(b4[0]).to.equal(0xa3);
  });

  it('stores wide refcounts big-endian', () => {
    const b = new Uint8Array(16);
    setRefcount(b, 1, 4, 0x0102);
    expect([...b.subarray(2, 4)]).to.deep.equal([1, 2]);
    setRefcount(b, 1, 6, 0x0a0b0c);
    expect([...b.subarray(8, 16)]).to.deep.equal([0, 0, 0, 0, 0, 0x0a, 0x0b, 0x0c]);
  });

  it('rejects a value that does not fit the width', () => {
    expect(() => setRefcount(new Uint8Array(1), 0, 0, 2)).to.throw(RangeError);
    expect(() => setRefcount(new Uint8Array(2), 0, 3, 256)).to.throw(RangeError);
  });

  it('does not disturb neighbouring entries when overwriting a sub-byte entry', () => {
    const b = new Uint8Array(1).fill(0xff);
    setRefcount(b, 2, 1, 0);
    expect(b[0]).to.equal(0b11001111);
  });
});

describe('RefcountManager', () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vblk-rc-'));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  /** A minimal refcount layout: header cluster 0, table at cluster 1, block at cluster 2. */
  async function layout(clusterBits: number, order: number): Promise<{ file: NodeImageFile; rc: RefcountManager }> {
    const cs = 2 ** clusterBits;
    const p = path.join(dir, 'img');
    const img = Buffer.alloc(3 * cs);
    img.writeBigUInt64BE(BigInt(2 * cs), cs);
    const block = new Uint8Array(cs);
    for (let i = 0; i < 3; i++) setRefcount(block, i, order, 1);
    img.set(block, 2 * cs);
    fs.writeFileSync(p, img);
    const file = await NodeImageFile.open(p, { writable: true });
    const rc = await RefcountManager.load(file, { clusterBits, refcountOrder: order, tableOffset: cs, tableClusters: 1 });
    return { file, rc };
  }

  it('allocates after the used clusters and reuses a released one first', async () => {
    const { file, rc } = await layout(16, 4);
    expect(await rc.allocate(1)).to.equal(3 * 65536);
    expect(await rc.allocate(2)).to.equal(4 * 65536);
    await rc.release(4 * 65536, 65536);
    expect(await rc.get(4)).to.equal(0);
    expect(await rc.allocate(1)).to.equal(4 * 65536);
    await file.close();
  });

  it('grows the refcount table and adds self-describing blocks when the image grows (512 B clusters, 64-bit refcounts)', async () => {
    const { file, rc } = await layout(9, 6);
    // One block covers 64 clusters, one table cluster 64 blocks: 4096 clusters force growth.
    const offs: number[] = [];
    for (let i = 0; i < 5000; i++) offs.push(await rc.allocate(1));
    expect(new Set(offs).size).to.equal(5000);
    expect(rc.tableClusters).to.be.greaterThan(1);
    await rc.flush();
    await file.sync();
    // Reload from disk: header fields point at the new table, every allocated cluster has refcount 1.
    const hdr = Buffer.alloc(12);
    await file.read(hdr, 48);
    const again = await RefcountManager.load(file, { clusterBits: 9, refcountOrder: 6, tableOffset: Number(hdr.readBigUInt64BE(0)), tableClusters: hdr.readUInt32BE(8) });
    for (const o of offs) expect(await again.getAt(o)).to.equal(1);
    // Blocks and the new table are counted; the old table (cluster 1) was released and reused.
    for (const b of again.table) if (b !== 0) expect(await again.getAt(b)).to.equal(1);
    expect(offs, "the old table cluster is reused").to.include(512);
    for (let c = 0; c < again.tableClusters; c++) expect(await again.getAt(again.tableOffset + c * 512)).to.equal(1);
    await file.close();
  });

  it('rejects a refcount table entry with reserved bits', async () => {
    const { file } = await layout(16, 4);
    const e = Buffer.alloc(8);
    e.writeBigUInt64BE(0x20001n);
    await file.write(e, 65536);
    let err: unknown;
    try {
      await RefcountManager.load(file, { clusterBits: 16, refcountOrder: 4, tableOffset: 65536, tableClusters: 1 });
    } catch (x) {
      err = x;
    }
    expect(err).to.have.property('code', 'E_QCOW_CORRUPT');
    await file.close();
  });
});
