/**
 * A write never trusts an offset read from the image: a data entry that points at metadata, is
 * misaligned or lies past the end of the file is refused with E_QCOW_CORRUPT (one line naming
 * the entry), and the bytes it points at stay as they were. qcow2 and qcow alike.
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

/** A qcow2 image whose guest cluster 0 is allocated; returns where its L1, L2 and data live. */
function qcow2WithData(img: string): { l1: number; l2: number; data: number; reftable: number } {
  createImage(img, '4M');
  qemuIo(img, ['write -P 1 0 64k']);
  const l1 = u64(img, 40);
  const l2 = offsetOf(readBytes(img, l1, 8).readBigUInt64BE(0));
  const data = offsetOf(readBytes(img, l2, 8).readBigUInt64BE(0));
  return { l1, l2, data, reftable: u64(img, 48) };
}

/** Points L2 entry 0 of the table at `l2` to `target` (COPIED, so the write may go in place). */
function pointEntry(img: string, l2: number, target: number, flags = COPIED): void {
  pokeBytes(img, l2, be64(BigInt(target) | flags));
}

/** Writes guest cluster 0 through vblk and checks the refusal; returns the output line. */
async function refusedWrite(img: string, fmt: 'qcow2' | 'qcow'): Promise<string> {
  const r = await vblk('io', '-f', fmt, '-c', 'write -P 0x99 0 4k', img);
  expect(r.status, r.stdout + r.stderr).to.equal(1);
  expect(r.stdout, 'nothing on stdout').to.equal('');
  const lines = r.stderr.trim().split('\n');
  expect(lines, r.stderr).to.have.length(1);
  expect(lines[0]).to.match(/L2 entry 0 of table 0x[0-9a-f]+/);
  return lines[0] ?? '';
}

describe('qcow2 read-write: offsets from the image are validated before a write', function () {
  this.timeout(60000);
  const tmp = useTempDir('vblk-woff-');
  before(function () {
    requireQemu(this);
  });

  const targets: { name: string; where: (m: ReturnType<typeof qcow2WithData>) => number; says: RegExp }[] = [
    { name: 'the L1 table', where: (m) => m.l1, says: /metadata cluster/ },
    { name: 'its own L2 table', where: (m) => m.l2, says: /metadata cluster/ },
    { name: 'the refcount table', where: (m) => m.reftable, says: /metadata cluster/ },
  ];
  for (const t of targets) {
    it(`a data entry pointing at ${t.name} is refused and ${t.name} is left as it was`, async () => {
      const img = tmp.file('meta.qcow2');
      const m = qcow2WithData(img);
      const target = t.where(m);
      pointEntry(img, m.l2, target);
      const before = readBytes(img, target, CLUSTER);
      expect(await refusedWrite(img, 'qcow2')).to.match(t.says);
      expect(readBytes(img, target, CLUSTER).equals(before), `${t.name} changed`).to.equal(true);
    });
  }

  it('a data entry pointing at the snapshot table is refused and the snapshot stays readable', async () => {
    const img = tmp.file('snap.qcow2');
    createImage(img, '4M');
    qemuIo(img, ['write -P 1 0 64k']);
    qemuImg('snapshot', '-c', 's1', img);
    qemuIo(img, ['write -P 2 0 64k']); // cluster 0 copied away from the snapshot: COPIED again
    const l1 = u64(img, 40);
    const l2 = offsetOf(readBytes(img, l1, 8).readBigUInt64BE(0));
    const snapshots = u64(img, 64);
    const before = readBytes(img, snapshots, 512);
    pointEntry(img, l2, snapshots);
    expect(await refusedWrite(img, 'qcow2')).to.match(/metadata cluster/);
    expect(readBytes(img, snapshots, 512).equals(before)).to.equal(true);
  });

  it('a misaligned data offset is refused and the cluster it falls in is left as it was', async () => {
    const img = tmp.file('misaligned.qcow2');
    const m = qcow2WithData(img);
    pointEntry(img, m.l2, m.data + 512);
    const before = readBytes(img, m.data, CLUSTER);
    expect(await refusedWrite(img, 'qcow2')).to.match(/not cluster-aligned/);
    expect(readBytes(img, m.data, CLUSTER).equals(before)).to.equal(true);
  });

  it('a data offset past the end of the file is refused and the file does not grow', async () => {
    const img = tmp.file('eof.qcow2');
    const m = qcow2WithData(img);
    const size = fs.statSync(img).size;
    pointEntry(img, m.l2, Math.ceil(size / CLUSTER) * CLUSTER + 16 * CLUSTER);
    expect(await refusedWrite(img, 'qcow2')).to.match(/past the end of the file/);
    expect(fs.statSync(img).size).to.equal(size);
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
    const cluster = 2 ** (readBytes(img, 32, 1).readUInt8(0));
    const l1 = u64(img, 40);
    const l2 = u64(img, l1);
    return { l1, l2, data: u64(img, l2), cluster };
  }

  // (Cluster 0 holds the header; an entry of offset 0 means "unallocated", so it cannot point there.)
  const targets: { name: string; size: string; where: (m: ReturnType<typeof qcowWithData>) => number; says: RegExp }[] = [
    // 2 GiB: 1024 L1 entries from byte 48 reach into clusters 1 and 2.
    { name: 'the L1 table', size: '2G', where: (m) => m.cluster, says: /overlaps the L1 table/ },
    { name: 'its own L2 table', size: '4M', where: (m) => m.l2 - (m.l2 % m.cluster), says: /overlaps the L2 table/ },
  ];
  for (const t of targets) {
    it(`a data entry pointing at ${t.name} is refused and ${t.name} is left as it was`, async () => {
      const img = tmp.file('meta.qcow');
      const m = qcowWithData(img, t.size);
      const target = t.where(m);
      pokeBytes(img, m.l2, be64(BigInt(target)));
      const before = fs.readFileSync(img);
      expect(await refusedWrite(img, 'qcow')).to.match(t.says);
      expect(fs.readFileSync(img).equals(before), 'the image file changed').to.equal(true);
    });
  }

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
});
