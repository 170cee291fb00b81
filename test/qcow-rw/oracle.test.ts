/**
 * Oracle tests of the qcow2 write path: seeded random write / zero / discard workloads on images
 * of many shapes, then `qemu-img check` must be clean (exit 0, no leaks) and `qemu-img compare`
 * against a raw mirror of the same operations must say identical.
 */
import { expect } from 'chai';
import * as fs from 'node:fs';
import { createImage } from '../../src/disk/qcow/create';
import { openDiskImage } from '../../src/disk/open';
import { checkQcow2, checkExitCode } from '../../src/disk/qcow/check';
import { requireQemu, useTempDir, createImage as qemuCreate, qemuImg, qemuIo, run } from '../helpers/qemu';
import { makeOps, applyOps, applyToMirror, qemuCheck, qemuCompare, type Op } from './workload';

const SIZE = 4 << 20;

function opsToQemuIo(ops: readonly Op[], cs: number): string[] {
  const out: string[] = [];
  for (const op of ops) {
    if (op.kind === 'write') out.push(`write -P 0x${op.byte.toString(16)} ${op.off} ${op.len}`);
    else if (op.kind === 'zero') out.push(`write -z ${op.unmap ? '-u ' : ''}${op.off} ${op.len}`);
    else if (op.kind === 'discard') {
      // Only whole clusters, as the mirror models it.
      const first = Math.ceil(op.off / cs) * cs;
      const last = Math.floor((op.off + op.len) / cs) * cs;
      if (last > first) out.push(`discard ${first} ${last - first}`);
    } else out.push('flush');
  }
  return out;
}

describe('qcow2 read-write: random workloads against qemu-img check and compare', function () {
  this.timeout(120000);
  const tmp = useTempDir('vblk-rw-');
  before(function () {
    requireQemu(this);
  });

  const shapes: { name: string; cs: number; compat: '0.10' | '1.1'; rb: number; depth: number }[] = [
    { name: 'v3 64k refbits16', cs: 65536, compat: '1.1', rb: 16, depth: 1 },
    { name: 'v3 4k refbits1', cs: 4096, compat: '1.1', rb: 1, depth: 1 },
    { name: 'v3 512 refbits64 (refcount table growth)', cs: 512, compat: '1.1', rb: 64, depth: 1 },
    { name: 'v2 64k', cs: 65536, compat: '0.10', rb: 16, depth: 1 },
    { name: 'v2 512', cs: 512, compat: '0.10', rb: 16, depth: 1 },
    { name: 'v3 4k at queue depth 32', cs: 4096, compat: '1.1', rb: 16, depth: 32 },
    { name: 'v3 64k at queue depth 32', cs: 65536, compat: '1.1', rb: 16, depth: 32 },
  ];
  it('stays clean with a 4-table L2 cache (dirty tables written back on eviction)', async () => {
    const img = tmp.file('tiny-cache.qcow2');
    await createImage(img, { format: 'qcow2', size: SIZE, clusterSize: 512 });
    const disk = await openDiskImage(img, { l2CacheBytes: 2048 });
    const mirror = new Uint8Array(SIZE);
    await applyOps(disk, mirror, makeOps(99, 600, SIZE, 512, { zero: true, discard: true, maxClusters: 16 }), { clusterSize: 512, depth: 8 });
    await disk.close();
    const c = qemuCheck(img);
    expect(c.status, c.out).to.equal(0);
    expect(qemuCompare(img, mirror, tmp.file('tiny-cache.raw')).status).to.equal(0);
  });

  shapes.forEach((sh, i) => {
    it(`stays clean and identical to the mirror: ${sh.name}`, async () => {
      const img = tmp.file(`w${i}.qcow2`);
      await createImage(img, { format: 'qcow2', size: SIZE, clusterSize: sh.cs, compat: sh.compat, refcountBits: sh.rb });
      const disk = await openDiskImage(img);
      const mirror = new Uint8Array(SIZE);
      await applyOps(disk, mirror, makeOps(100 + i, 600, SIZE, sh.cs, { zero: true, discard: true }), { clusterSize: sh.cs, depth: sh.depth });
      await disk.close();
      const c = qemuCheck(img);
      expect(c.status, c.out).to.equal(0);
      expect(c.out).to.match(/No errors were found/);
      const ours = await checkQcow2(img);
      expect(checkExitCode(ours), ours.messages.join('\n')).to.equal(0);
      const cmp = qemuCompare(img, mirror, tmp.file(`w${i}.raw`));
      expect(cmp.status, cmp.out).to.equal(0);
    });
  });

  for (const backingFmt of ['qcow2', 'raw'] as const) {
    for (const compat of ['1.1', '0.10'] as const) {
      it(`overlay (compat ${compat}) over a ${backingFmt} backing file: partial writes copy the rest from the backing file`, async () => {
        const base = tmp.file(`base-${backingFmt}-${compat}.${backingFmt}`);
        qemuCreate(base, SIZE, { format: backingFmt });
        qemuIo(base, ['write -P 0x5a 0 4M', 'write -P 0x6b 65536 65536'], { format: backingFmt });
        qemuImg('convert', '-f', backingFmt, '-O', 'raw', base, tmp.file('b.raw'));
        const mirror = new Uint8Array(fs.readFileSync(tmp.file('b.raw')));
        const top = tmp.file(`top-${backingFmt}-${compat}.qcow2`);
        await createImage(top, { format: 'qcow2', backingFile: base, backingFormat: backingFmt, clusterSize: 4096, compat });
        const disk = await openDiskImage(top);
        const cs = 4096;
        // v3 discard of a cluster over a backing file leaves a zero cluster; v2 leaves it alone.
        const discardMirror = compat === '1.1' ? (o: number, l: number) => mirror.fill(0, o, o + l) : () => undefined;
        await applyOps(disk, mirror, makeOps(7, 500, SIZE, cs, { zero: true, discard: true }), { clusterSize: cs, discardMirror });
        await disk.close();
        const c = qemuCheck(top);
        expect(c.status, c.out).to.equal(0);
        const cmp = qemuCompare(top, mirror, tmp.file(`top-${backingFmt}-${compat}.raw`));
        expect(cmp.status, cmp.out).to.equal(0);
      });
    }
  }

  it('copies on write into clusters shared with internal snapshots and keeps the snapshots intact', async () => {
    const img = tmp.file('snap.qcow2');
    qemuCreate(img, SIZE, { options: { cluster_size: '4k' } });
    qemuIo(img, ['write -P 0x11 0 2M', 'write -P 0x22 3M 512k']);
    qemuImg('snapshot', '-c', 'snap1', img);
    qemuIo(img, ['write -P 0x33 1M 64k']);
    qemuImg('snapshot', '-c', 'snap2', img);
    qemuImg('convert', '-l', 'snapshot.name=snap1', '-O', 'raw', img, tmp.file('snap1-before.raw'));
    qemuImg('convert', '-O', 'raw', img, tmp.file('active.raw'));
    const mirror = new Uint8Array(fs.readFileSync(tmp.file('active.raw')));
    const disk = await openDiskImage(img);
    await applyOps(disk, mirror, makeOps(11, 500, SIZE, 4096, { zero: true, discard: true }), { clusterSize: 4096 });
    await disk.close();
    const c = qemuCheck(img);
    expect(c.status, c.out).to.equal(0);
    expect(qemuCompare(img, mirror, tmp.file('snap-mirror.raw')).status).to.equal(0);
    qemuImg('convert', '-l', 'snapshot.name=snap1', '-O', 'raw', img, tmp.file('snap1-after.raw'));
    expect(fs.readFileSync(tmp.file('snap1-after.raw')).equals(fs.readFileSync(tmp.file('snap1-before.raw')))).to.equal(true);
  });

  it('rewrites compressed clusters (decompress, copy on write, free the compressed data)', async () => {
    const raw = tmp.file('c-src.raw');
    qemuCreate(raw, SIZE, { format: 'raw' });
    qemuIo(raw, ['write -P 0x77 0 3M', 'write -P 0x78 3M 1M'], { format: 'raw' });
    const img = tmp.file('c.qcow2');
    qemuImg('convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4k', raw, img);
    const mirror = new Uint8Array(fs.readFileSync(raw));
    const disk = await openDiskImage(img);
    await applyOps(disk, mirror, makeOps(12, 500, SIZE, 4096, { zero: true, discard: true }), { clusterSize: 4096 });
    await disk.close();
    const c = qemuCheck(img);
    expect(c.status, c.out).to.equal(0);
    expect(qemuCompare(img, mirror, tmp.file('c-mirror.raw')).status).to.equal(0);
  });

  it('interoperates with qemu-io: qemu-io then vblk, then qemu-io again, stays identical to the mirror', async () => {
    const cs = 65536;
    const img = tmp.file('inter.qcow2');
    qemuCreate(img, SIZE);
    const mirror = new Uint8Array(SIZE);
    const ops1 = makeOps(21, 150, SIZE, cs, { zero: true, discard: true });
    applyToMirror(mirror, ops1, cs);
    qemuIo(img, opsToQemuIo(ops1, cs));
    const disk = await openDiskImage(img);
    await applyOps(disk, mirror, makeOps(22, 300, SIZE, cs, { zero: true, discard: true }), { clusterSize: cs });
    await disk.close();
    expect(qemuCheck(img).status).to.equal(0);
    const ops3 = makeOps(23, 150, SIZE, cs, { zero: true, discard: true });
    applyToMirror(mirror, ops3, cs);
    qemuIo(img, opsToQemuIo(ops3, cs));
    const c = qemuCheck(img);
    expect(c.status, c.out).to.equal(0);
    expect(qemuCompare(img, mirror, tmp.file('inter.raw')).status).to.equal(0);
  });

  it('writes zero clusters in v3 (ZERO_ALLOC without unmap, ZERO_PLAIN with) and deallocates in v2', async () => {
    const v3 = tmp.file('z3.qcow2');
    await createImage(v3, { format: 'qcow2', size: SIZE });
    let d = await openDiskImage(v3);
    await d.writeSector(0, new Uint8Array(131072).fill(9));
    await d.writeZeroes(0, 128, false);
    await d.writeZeroes(128, 128, true);
    await d.close();
    const map3 = JSON.parse(run('qemu-img', ['map', '--output=json', v3]).stdout) as { start: number; zero: boolean; data: boolean; offset?: number }[];
    expect(map3[0]).to.include({ start: 0, zero: true, data: false });
    expect(map3[0]?.offset, 'ZERO_ALLOC keeps its cluster').to.be.a('number');
    expect(qemuCheck(v3).status).to.equal(0);
    const v2 = tmp.file('z2.qcow2');
    await createImage(v2, { format: 'qcow2', size: SIZE, compat: '0.10' });
    d = await openDiskImage(v2);
    await d.writeSector(0, new Uint8Array(65536).fill(9));
    await d.writeZeroes(0, 128, false);
    await d.close();
    const map2 = JSON.parse(run('qemu-img', ['map', '--output=json', v2]).stdout) as { start: number; data: boolean }[];
    expect(map2[0]).to.include({ start: 0, data: false });
    expect(qemuCheck(v2).status).to.equal(0);
  });
});
