/**
 * A write never trusts an offset read from the image. A data entry, an L1 entry or a refcount
 * table entry that points at other metadata, a misaligned data offset or one past the end of the
 * file is refused with E_QCOW_CORRUPT (one line naming the entry and what it overlaps), and the
 * metadata stays as it was: qcow2 only sets its corrupt bit, as QEMU does. qcow2 and qcow alike.
 */
import { expect } from 'chai';
import * as fs from 'node:fs';
import { vblk } from '../cli/run-vblk';
import { requireQemu, useTempDir, createImage, qemuIo, qemuImg, readBytes, pokeBytes, be64 } from '../helpers/qemu';

function u64(img: string, off: number): number {
  return Number(readBytes(img, off, 8).readBigUInt64BE(0));
}

const COPIED = 1n << 63n;
/** The host offset bits of a qcow2 L1/L2 entry (flags masked off). */
const offsetOf = (entry: bigint): number => Number(entry & 0x00fffffffffffe00n);
const CLUSTER = 65536;
/** qcow2 incompatible feature bit 1 (bytes 72..79 of the header): the image is corrupt. */
const CORRUPT_BIT = 2n;

/** A qcow2 image whose guest cluster 0 is allocated; returns where its structures live. */
function qcow2WithData(img: string): { l1: number; l2: number; data: number; reftable: number; refblock: number } {
  createImage(img, '4M');
  qemuIo(img, ['write -P 1 0 64k']);
  const l1 = u64(img, 40);
  const l2 = offsetOf(readBytes(img, l1, 8).readBigUInt64BE(0));
  const data = offsetOf(readBytes(img, l2, 8).readBigUInt64BE(0));
  const reftable = u64(img, 48);
  return { l1, l2, data, reftable, refblock: u64(img, reftable) };
}

/** Points L2 entry 0 of the table at `l2` to `target` (COPIED, so the write may go in place). */
function pointEntry(img: string, l2: number, target: number, flags = COPIED): void {
  pokeBytes(img, l2, be64(BigInt(target) | flags));
}

/** Runs one vblk write and checks the refusal: exit 1, nothing on stdout, one line on stderr; returns it. */
async function refusedWrite(img: string, fmt: 'qcow2' | 'qcow', cmd = 'write -P 0x99 0 4k'): Promise<string> {
  const r = await vblk('io', '-f', fmt, '-c', cmd, img);
  expect(r.status, r.stdout + r.stderr).to.equal(1);
  expect(r.stdout, 'nothing on stdout').to.equal('');
  const lines = r.stderr.trim().split('\n');
  expect(lines, r.stderr).to.have.length(1);
  return lines[0] ?? '';
}

/** The qcow2 image holds exactly the bytes it held before, apart from the corrupt bit the refusal sets (as QEMU sets it). */
function expectOnlyCorruptBitSet(img: string, before: Buffer): void {
  const after = fs.readFileSync(img);
  expect(after.readBigUInt64BE(72) & CORRUPT_BIT, 'corrupt bit').to.equal(CORRUPT_BIT);
  const unmarked = Buffer.from(after);
  unmarked.writeBigUInt64BE(before.readBigUInt64BE(72), 72);
  expect(unmarked.length, 'file size').to.equal(before.length);
  expect(unmarked.equals(before), 'bytes other than the corrupt bit changed').to.equal(true);
}

describe('qcow2 read-write: offsets from the image are validated before a write', function () {
  this.timeout(60000);
  const tmp = useTempDir('vblk-woff-');
  before(function () {
    requireQemu(this);
  });

  const targets: { name: string; where: (m: ReturnType<typeof qcow2WithData>) => number; says: RegExp }[] = [
    { name: 'the L1 table', where: (m) => m.l1, says: /^vblk: write failed: .*: L2 entry 0 of table 0x[0-9a-f]+ \(0x[0-9a-f]+\) has data offset 0x[0-9a-f]+, which overlaps the L1 table at 0x[0-9a-f]+; the image is now marked corrupt$/ },
    { name: 'its own L2 table', where: (m) => m.l2, says: /L2 entry 0 of table .* overlaps the L2 table at / },
    { name: 'the refcount table', where: (m) => m.reftable, says: /L2 entry 0 of table .* overlaps the refcount table at / },
    { name: 'a refcount block', where: (m) => m.refblock, says: /L2 entry 0 of table .* overlaps refcount block 0 at / },
  ];
  for (const t of targets) {
    it(`a data entry pointing at ${t.name} is refused and only the corrupt bit changes`, async () => {
      const img = tmp.file('meta.qcow2');
      const m = qcow2WithData(img);
      pointEntry(img, m.l2, t.where(m));
      const before = fs.readFileSync(img);
      expect(await refusedWrite(img, 'qcow2')).to.match(t.says);
      expectOnlyCorruptBitSet(img, before);
    });
  }

  it('a data entry pointing at the snapshot table is refused and only the corrupt bit changes', async () => {
    const img = tmp.file('snap.qcow2');
    createImage(img, '4M');
    qemuIo(img, ['write -P 1 0 64k']);
    qemuImg('snapshot', '-c', 's1', img);
    qemuIo(img, ['write -P 2 0 64k']); // cluster 0 copied away from the snapshot: COPIED again
    const l1 = u64(img, 40);
    const l2 = offsetOf(readBytes(img, l1, 8).readBigUInt64BE(0));
    pointEntry(img, l2, u64(img, 64));
    const before = fs.readFileSync(img);
    expect(await refusedWrite(img, 'qcow2')).to.match(/has data offset 0x[0-9a-f]+, which overlaps the snapshot table at /);
    expectOnlyCorruptBitSet(img, before);
  });

  it('a data entry of offset 0 (the header) is unallocated, as in QEMU: the write goes to a new cluster and the header stays', async () => {
    const img = tmp.file('header.qcow2');
    const m = qcow2WithData(img);
    pointEntry(img, m.l2, 0);
    const header = readBytes(img, 0, CLUSTER);
    const r = await vblk('io', '-c', 'write -P 0x99 0 4k', img);
    expect(r.status, r.stderr).to.equal(0);
    expect(readBytes(img, 0, CLUSTER).equals(header), 'the header changed').to.equal(true);
    qemuIo(img, ['read -P 0x99 0 4k', 'read -P 0 4k 60k'], { readonly: true });
  });

  it('a misaligned data offset is refused and only the corrupt bit changes', async () => {
    const img = tmp.file('misaligned.qcow2');
    const m = qcow2WithData(img);
    pointEntry(img, m.l2, m.data + 512);
    const before = fs.readFileSync(img);
    expect(await refusedWrite(img, 'qcow2')).to.match(/L2 entry 0 of table .* has data offset 0x[0-9a-f]+, not cluster-aligned/);
    expectOnlyCorruptBitSet(img, before);
  });

  it('a data offset past the end of the file is refused and the file does not grow', async () => {
    const img = tmp.file('eof.qcow2');
    const m = qcow2WithData(img);
    const size = fs.statSync(img).size;
    pointEntry(img, m.l2, Math.ceil(size / CLUSTER) * CLUSTER + 16 * CLUSTER);
    const before = fs.readFileSync(img);
    expect(await refusedWrite(img, 'qcow2')).to.match(/L2 entry 0 of table .* points to cluster 0x[0-9a-f]+ past the end of the file/);
    expectOnlyCorruptBitSet(img, before);
  });

  it('discarding a data entry that points at the L1 table is refused before the L1 cluster is freed', async () => {
    const img = tmp.file('discard-l1.qcow2');
    const m = qcow2WithData(img);
    pointEntry(img, m.l2, m.l1);
    const before = fs.readFileSync(img);
    expect(await refusedWrite(img, 'qcow2', 'discard 0 64k')).to.match(/L2 entry 0 of table .* has data offset 0x30000, which overlaps the L1 table at 0x30000/);
    expectOnlyCorruptBitSet(img, before);
  });

  it('a partial write into a compressed cluster whose stream lies past the end of the file is refused, as a read is', async () => {
    const img = tmp.file('compressed-eof.qcow2');
    const m = qcow2WithData(img);
    const size = fs.statSync(img).size;
    pointEntry(img, m.l2, size + CLUSTER, 1n << 62n); // compressed, one sector, past EOF
    const before = fs.readFileSync(img);
    expect(await refusedWrite(img, 'qcow2')).to.match(/L2 entry 0 of table .*: compressed cluster at 0x[0-9a-f]+ is past the end of the file/);
    expect(fs.readFileSync(img).equals(before), 'the image file changed').to.equal(true);
  });

  it('an L1 entry (with COPIED) pointing at the refcount table is refused before the table is changed in place', async () => {
    const img = tmp.file('l1-reftable.qcow2');
    const m = qcow2WithData(img);
    pokeBytes(img, m.l1, be64(BigInt(m.reftable) | COPIED));
    const before = fs.readFileSync(img);
    // Guest cluster 5: its "L2 entry" is refcount table entry 5, which is free, so the write
    // would allocate a cluster and store its offset there.
    const line = await refusedWrite(img, 'qcow2', 'write -P 0x99 320k 4k');
    expect(line).to.match(/L1 entry 0 \(0x8000000000010000\) has L2 table offset 0x10000, which overlaps the refcount table at 0x10000/);
    expectOnlyCorruptBitSet(img, before);
  });

  it('a misaligned L1 entry does not stop writes elsewhere, as in QEMU', async () => {
    const img = tmp.file('l1-misaligned-elsewhere.qcow2');
    createImage(img, '1G');
    qemuIo(img, ['write -P 1 0 64k', 'write -P 2 512M 64k']);
    const l1 = u64(img, 40);
    pokeBytes(img, l1 + 8, be64(BigInt(u64(img, l1 + 8)) + 512n)); // L1 entry 1 (guest 512M..1G)
    const r = await vblk('io', '-c', 'write -P 3 4k 4k', img);
    expect(r.status, r.stderr).to.equal(0);
    qemuIo(img, ['read -P 1 0 4k', 'read -P 3 4k 4k'], { readonly: true });
  });

  it('a write through a misaligned L1 entry is refused naming the entry, and only the corrupt bit changes', async () => {
    const img = tmp.file('l1-misaligned.qcow2');
    createImage(img, '1G');
    qemuIo(img, ['write -P 1 0 64k', 'write -P 2 512M 64k']);
    const l1 = u64(img, 40);
    pokeBytes(img, l1 + 8, be64(BigInt(u64(img, l1 + 8)) + 512n));
    const before = fs.readFileSync(img);
    expect(await refusedWrite(img, 'qcow2', 'write -P 3 512M 4k')).to.match(/Cannot write .*: L1 entry 1 \(0x8000000000[0-9a-f]+\) has L2 table offset 0x[0-9a-f]+, not cluster-aligned; the image is now marked corrupt$/);
    expectOnlyCorruptBitSet(img, before);
  });

  it('a refcount table entry pointing at the L1 table is refused before a refcount is written there', async () => {
    const img = tmp.file('reftable-l1.qcow2');
    const m = qcow2WithData(img);
    pokeBytes(img, m.reftable, be64(BigInt(m.l1)));
    const before = fs.readFileSync(img);
    const line = await refusedWrite(img, 'qcow2', 'write -P 0x99 1M 4k'); // needs a new cluster
    expect(line).to.match(/refcount table entry 0 has refcount block offset 0x30000, which overlaps the L1 table at 0x30000/);
    expectOnlyCorruptBitSet(img, before);
  });

  it('a cluster the refcounts wrongly call free is not handed out over metadata, and no refcount is written', async () => {
    const img = tmp.file('free-l1.qcow2');
    const m = qcow2WithData(img);
    pokeBytes(img, m.refblock + 2 * (m.l1 / CLUSTER), Buffer.alloc(2)); // 16-bit refcount of the L1 cluster: 0
    const before = fs.readFileSync(img);
    const line = await refusedWrite(img, 'qcow2', 'write -P 0x99 1M 4k');
    expect(line).to.match(/the allocator returned cluster 0x30000 for data, which overlaps the L1 table at 0x30000/);
    expectOnlyCorruptBitSet(img, before);
  });
});

describe('qcow read-write: offsets from the image are validated before a write', function () {
  this.timeout(60000);
  const tmp = useTempDir('vblk-woff1-');
  before(function () {
    requireQemu(this);
  });

  /** A qcow (version 1) image whose guest cluster 0 is allocated; where its L1, L2 and data live. */
  function qcowWithData(img: string, size = '4M'): { l1: number; l2: number; data: number; cluster: number } {
    createImage(img, size, { format: 'qcow' });
    qemuIo(img, ['write -P 1 0 4k'], { format: 'qcow' });
    const cluster = 2 ** readBytes(img, 32, 1).readUInt8(0);
    const l1 = u64(img, 40);
    const l2 = u64(img, l1);
    return { l1, l2, data: u64(img, l2), cluster };
  }

  /**
   * A qcow image over a raw backing file (qemu-img then picks 512-byte clusters) with guest
   * clusters 0 and 1 allocated, whose backing file name is moved into the data cluster of guest
   * cluster `nameIn` (QEMU reads the name wherever backing_file_offset points).
   */
  function qcowWithNameIn(img: string, nameIn: 0 | 1): { l2: number; data: number; name: number } {
    const base = tmp.file('base.raw');
    createImage(base, '4M', { format: 'raw' });
    createImage(img, '4M', { format: 'qcow', backing: 'base.raw', backingFormat: 'raw' });
    qemuIo(img, ['write -P 1 0 1k'], { format: 'qcow' });
    const l2 = u64(img, u64(img, 40));
    const data = u64(img, l2);
    const name = u64(img, l2 + 8 * nameIn);
    pokeBytes(img, name, readBytes(img, u64(img, 8), readBytes(img, 16, 4).readUInt32BE(0)));
    pokeBytes(img, 8, be64(BigInt(name)));
    return { l2, data, name };
  }

  const targets: { name: string; size: string; where: (m: ReturnType<typeof qcowWithData>) => number; says: RegExp }[] = [
    // 2 GiB: 1024 L1 entries from byte 48 reach into clusters 1 and 2.
    { name: 'the L1 table', size: '2G', where: (m) => m.cluster, says: /^vblk: write failed: .*: L2 entry 0 of table 0x[0-9a-f]+ \(0x[0-9a-f]+\) has data offset 0x1000, which overlaps the L1 table at 0x30$/ },
    { name: 'its own L2 table', size: '4M', where: (m) => m.l2 - (m.l2 % m.cluster), says: /L2 entry 0 of table .* overlaps the L2 table at / },
  ];
  for (const t of targets) {
    it(`a data entry pointing at ${t.name} is refused and the file is left as it was`, async () => {
      const img = tmp.file('meta.qcow');
      const m = qcowWithData(img, t.size);
      pokeBytes(img, m.l2, be64(BigInt(t.where(m))));
      const before = fs.readFileSync(img);
      expect(await refusedWrite(img, 'qcow')).to.match(t.says);
      expect(fs.readFileSync(img).equals(before), 'the image file changed').to.equal(true);
    });
  }

  it('a data entry pointing at the backing file name (part of the header) is refused and the file is left as it was', async () => {
    const img = tmp.file('name.qcow');
    qcowWithNameIn(img, 0);
    const before = fs.readFileSync(img);
    expect(await refusedWrite(img, 'qcow', 'write -P 0x99 0 512')).to.match(/L2 entry 0 of table .* has data offset 0x[0-9a-f]+, which overlaps the backing file name at 0x[0-9a-f]+$/);
    expect(fs.readFileSync(img).equals(before), 'the image file changed').to.equal(true);
  });

  it('a data cluster below a backing file name stored further into the file is written in place', async () => {
    const img = tmp.file('name-after.qcow');
    const m = qcowWithNameIn(img, 1);
    expect(m.data).to.be.below(m.name);
    const r = await vblk('io', '-f', 'qcow', '-c', 'write -P 0x99 0 512', img);
    expect(r.status, r.stderr).to.equal(0);
    expect(u64(img, m.l2), 'L2 entry 0').to.equal(m.data);
    qemuIo(img, ['read -P 0x99 0 512'], { format: 'qcow', readonly: true });
  });

  it('an L1 entry pointing into the L1 table is refused before the table is changed in place', async () => {
    const img = tmp.file('l1-l1.qcow');
    createImage(img, '2G', { format: 'qcow' }); // 1024 L1 entries from byte 48: clusters 0..2
    pokeBytes(img, u64(img, 40), be64(0x1000n));
    const before = fs.readFileSync(img);
    expect(await refusedWrite(img, 'qcow')).to.match(/L1 entry 0 \(0x1000\) has L2 table offset 0x1000, which overlaps the L1 table at 0x30$/);
    expect(fs.readFileSync(img).equals(before), 'the image file changed').to.equal(true);
  });

  it('a misaligned data offset is refused and the file is left as it was', async () => {
    const img = tmp.file('misaligned.qcow');
    const m = qcowWithData(img);
    pokeBytes(img, m.l2, be64(BigInt(m.data + 512)));
    const before = fs.readFileSync(img);
    expect(await refusedWrite(img, 'qcow')).to.match(/not cluster-aligned/);
    expect(fs.readFileSync(img).equals(before)).to.equal(true);
  });

  it('a data offset past the end of the file is refused and the file is left as it was', async () => {
    const img = tmp.file('eof.qcow');
    const m = qcowWithData(img);
    const size = fs.statSync(img).size;
    pokeBytes(img, m.l2, be64(BigInt(Math.ceil(size / m.cluster) * m.cluster + 16 * m.cluster)));
    const before = fs.readFileSync(img);
    expect(await refusedWrite(img, 'qcow')).to.match(/past the end of the file/);
    expect(fs.readFileSync(img).equals(before)).to.equal(true);
  });

  it('a partial write into a compressed cluster whose stream lies past the end of the file is refused, as a read is', async () => {
    const img = tmp.file('compressed-eof.qcow');
    const m = qcowWithData(img);
    const size = fs.statSync(img).size;
    // bit 63: compressed; csize (bits 51..62 with 4 KiB clusters) 100 bytes; offset past EOF.
    pokeBytes(img, m.l2, be64((1n << 63n) | (100n << 51n) | BigInt(size + 4096)));
    const before = fs.readFileSync(img);
    expect(await refusedWrite(img, 'qcow', 'write -P 0x99 0 512')).to.match(/L2 entry 0 of table .* points to compressed data at 0x[0-9a-f]+ past the end of the file/);
    expect(fs.readFileSync(img).equals(before)).to.equal(true);
  });
});
