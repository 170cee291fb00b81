/**
 * Crash and fault-injection matrix (a TypeScript take on qemu-iotest 026): a workload of more than
 * 200 writes runs over a `FaultyFile` that crashes after write N (for a spread of N) or fails
 * write/sync N with EIO/ENOSPC. Afterwards `qemu-img check` must find no corruption (exit 0 or 3:
 * leaks are allowed) and every write acknowledged by a flush before the crash must read back.
 */
import { expect } from 'chai';
import * as fs from 'node:fs';
import { createImage } from '../../src/disk/qcow/create';
import { openQcow2ReadWrite } from '../../src/disk/qcow/qcow2-rw';
import { openQcow1ReadWrite } from '../../src/disk/qcow/qcow1-rw';
import { FaultyFile, type FaultPlan } from '../../src/disk/faulty-file';
import { NodeImageFile } from '../../src/disk/file';
import { openDiskImage } from '../../src/disk/open';
import type { DiskImage } from '../../src/disk/disk-image';
import { requireQemu, useTempDir, run } from '../helpers/qemu';
import { makeOps, qemuCheck, type Op } from './workload';

const SIZE = 2 << 20;
const CS = 4096;

interface Outcome {
  /** Mirror as of the last flush that completed before the crash. */
  durable: Uint8Array;
  /** Sectors written (or zeroed/discarded) after that flush: may hold either value. */
  touched: Uint8Array;
  writes: number;
  syncs: number;
  errors: number;
}

/** Runs `ops` on a qcow2 image through a FaultyFile; never throws for injected faults. */
async function runFaulty(img: string, ops: readonly Op[], plan: FaultPlan, l2CacheBytes?: number, clusterSize = CS, format: 'qcow2' | 'qcow' = 'qcow2'): Promise<Outcome> {
  const file = new FaultyFile(await NodeImageFile.open(img, { writable: true }), plan);
  const mirror = new Uint8Array(SIZE);
  let durable = new Uint8Array(SIZE);
  let touched = new Uint8Array(SIZE / 512);
  let errors = 0;
  let disk: DiskImage | undefined;
  try {
    const o = l2CacheBytes === undefined ? { path: img } : { path: img, l2CacheBytes };
    disk = format === 'qcow' ? await openQcow1ReadWrite(file, o) : await openQcow2ReadWrite(file, o);
  } catch {
    return { durable, touched, writes: file.writes, syncs: file.syncs, errors: 1 };
  }
  const touch = (off: number, len: number): void => {
    touched.fill(1, off / 512, (off + len) / 512);
  };
  for (const op of ops) {
    try {
      if (op.kind === 'flush') {
        await disk.flush();
        if (!file.crashed && file.injected === 0) {
          durable = mirror.slice();
          touched = new Uint8Array(SIZE / 512);
        }
      } else if (op.kind === 'write') {
        mirror.fill(op.byte, op.off, op.off + op.len);
        touch(op.off, op.len);
        await disk.writeSector(op.off / 512, new Uint8Array(op.len).fill(op.byte));
      } else if (op.kind === 'zero') {
        mirror.fill(0, op.off, op.off + op.len);
        touch(op.off, op.len);
        await disk.writeZeroes(op.off / 512, op.len / 512, op.unmap);
      } else {
        const first = Math.ceil(op.off / clusterSize) * clusterSize;
        const last = Math.floor((op.off + op.len) / clusterSize) * clusterSize;
        if (last > first) mirror.fill(0, first, last);
        touch(op.off, op.len);
        await disk.discard(op.off / 512, op.len / 512);
      }
    } catch {
      errors++;
    }
  }
  try {
    await disk.close();
  } catch {
    errors++;
  }
  return { durable, touched, writes: file.writes, syncs: file.syncs, errors };
}

/** Reads the whole image (vblk, read-only) and compares the durable, untouched sectors. */
async function verifyDurable(img: string, o: Outcome): Promise<void> {
  const d = await openDiskImage(img, { readonly: true });
  const buf = new Uint8Array(SIZE);
  await d.readSector(0, buf);
  await d.close();
  for (let s = 0; s < SIZE / 512; s++) {
    if (o.touched[s]) continue;
    const a = buf.subarray(s * 512, s * 512 + 512);
    const b = o.durable.subarray(s * 512, s * 512 + 512);
    if (!Buffer.from(a).equals(Buffer.from(b))) expect.fail(`sector ${s} lost a flushed write (got ${a[0]}, want ${b[0]})`);
  }
}

function sample(total: number, count: number): number[] {
  if (total <= count) return Array.from({ length: total }, (_, i) => i + 1);
  const out = new Set<number>([1, 2, 3, total]);
  for (let i = 0; i < count; i++) out.add(1 + Math.floor((i * total) / count));
  return [...out].sort((a, b) => a - b);
}

describe('qcow2 read-write: crash and I/O-error matrix', function () {
  this.timeout(300000);
  const tmp = useTempDir('vblk-crash-');
  const ops = makeOps(4242, 300, SIZE, CS, { zero: true, discard: true, maxClusters: 2 });
  let template = '';
  let total = { writes: 0, syncs: 0 };

  before(async function () {
    requireQemu(this);
    template = tmp.file('template.qcow2');
    // 512-byte refcount blocks of 64-bit entries: the workload also grows the refcount table.
    await createImage(template, { format: 'qcow2', size: SIZE, clusterSize: CS, refcountBits: 64 });
    const probe = tmp.file('probe.qcow2');
    fs.copyFileSync(template, probe);
    const o = await runFaulty(probe, ops, {});
    expect(o.errors).to.equal(0);
    total = { writes: o.writes, syncs: o.syncs };
    expect(ops.filter((x) => x.kind === 'write').length).to.be.greaterThan(200);
    const c = qemuCheck(probe);
    expect(c.status, c.out).to.equal(0);
  });

  for (const unsynced of ['keep', 'random', 'lose'] as const) {
    it(`crash after write N (sampled), unsynced writes ${unsynced}: no corruption, flushed data survives`, async () => {
      const points = sample(total.writes, unsynced === 'keep' ? 60 : 40);
      for (const n of points) {
        const img = tmp.file(`crash-${unsynced}-${n}.qcow2`);
        fs.copyFileSync(template, img);
        const o = await runFaulty(img, ops, { crashAfterWrite: n, unsynced, seed: n });
        const c = qemuCheck(img);
        expect([0, 3], `crash after write ${n}/${total.writes}: ${c.out}`).to.include(c.status);
        await verifyDurable(img, o);
        fs.rmSync(img);
      }
    });
  }

  it('crash after write N with a tiny L2 cache (dirty tables written back on eviction): no corruption', async () => {
    // 512-byte clusters: one L2 table covers 32 KiB, so the 2 MiB workload touches 64 tables
    // through a cache of 4 and dirty tables are written back on eviction all the time.
    const small = tmp.file('small-template.qcow2');
    await createImage(small, { format: 'qcow2', size: SIZE, clusterSize: 512 });
    const probe = tmp.file('small-probe.qcow2');
    fs.copyFileSync(small, probe);
    const p = await runFaulty(probe, ops, {}, 2048, 512);
    expect(p.errors).to.equal(0);
    expect(qemuCheck(probe).status).to.equal(0);
    for (const n of sample(p.writes, 40)) {
      const img = tmp.file(`small-crash-${n}.qcow2`);
      fs.copyFileSync(small, img);
      const o = await runFaulty(img, ops, { crashAfterWrite: n, unsynced: 'random', seed: n }, 2048, 512);
      const c = qemuCheck(img);
      expect([0, 3], `crash after write ${n}/${p.writes}: ${c.out}`).to.include(c.status);
      await verifyDurable(img, o);
      fs.rmSync(img);
    }
  });

  it('qcow (version 1): crash after write N (sampled) leaves a readable image with the flushed data', async () => {
    const q1 = tmp.file('q1-template.qcow');
    await createImage(q1, { format: 'qcow', size: SIZE });
    const probe = tmp.file('q1-probe.qcow');
    fs.copyFileSync(q1, probe);
    const p = await runFaulty(probe, ops, {}, undefined, CS, 'qcow');
    expect(p.errors).to.equal(0);
    for (const n of sample(p.writes, 30)) {
      const img = tmp.file(`q1-crash-${n}.qcow`);
      fs.copyFileSync(q1, img);
      const o = await runFaulty(img, ops, { crashAfterWrite: n, unsynced: 'random', seed: n }, undefined, CS, 'qcow');
      // qemu-img reads every cluster without an error, and so does vblk with the flushed data.
      const conv = run('qemu-img', ['convert', '-f', 'qcow', '-O', 'raw', img, tmp.file('q1.raw')]);
      expect(conv.status, `crash after write ${n}: ${conv.stderr}`).to.equal(0);
      await verifyDurable(img, o);
      fs.rmSync(img);
    }
  });

  for (const errno of ['EIO', 'ENOSPC'] as const) {
    it(`${errno} at write N and at sync N (sampled): requests fail, the image stays consistent`, async () => {
      const plans: FaultPlan[] = [
        ...sample(total.writes, 40).map((n) => ({ failWriteAt: n, errno })),
        ...sample(total.syncs, 20).map((n) => ({ failSyncAt: n, errno })),
      ];
      let surfaced = 0;
      for (const [i, plan] of plans.entries()) {
        const img = tmp.file(`fail-${errno}-${i}.qcow2`);
        fs.copyFileSync(template, img);
        const o = await runFaulty(img, ops, plan);
        if (o.errors > 0) surfaced++;
        const c = qemuCheck(img);
        expect([0, 3], `${JSON.stringify(plan)}: ${c.out}`).to.include(c.status);
        fs.rmSync(img);
      }
      expect(surfaced, 'injected errors surface as request errors').to.equal(plans.length);
    });
  }
});
