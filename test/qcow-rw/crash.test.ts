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
import { FaultyFile, type FaultPlan } from '../../src/disk/faulty-file';
import { NodeImageFile } from '../../src/disk/file';
import { openDiskImage } from '../../src/disk/open';
import type { DiskImage } from '../../src/disk/disk-image';
import { requireQemu, useTempDir } from '../helpers/qemu';
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
async function runFaulty(img: string, ops: readonly Op[], plan: FaultPlan): Promise<Outcome> {
  const file = new FaultyFile(await NodeImageFile.open(img, { writable: true }), plan);
  const mirror = new Uint8Array(SIZE);
  let durable = new Uint8Array(SIZE);
  let touched = new Uint8Array(SIZE / 512);
  let errors = 0;
  let disk: DiskImage | undefined;
  try {
    disk = await openQcow2ReadWrite(file, { path: img });
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
        const first = Math.ceil(op.off / CS) * CS;
        const last = Math.floor((op.off + op.len) / CS) * CS;
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
