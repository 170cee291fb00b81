/**
 * Seeded random write / zero / discard workloads applied both to a vblk image and to an
 * in-memory mirror of what the guest must read back, plus qemu-img oracle helpers.
 */
import * as fs from 'node:fs';
import type { DiskImage } from '../../src/disk/disk-image';
import { run } from '../helpers/qemu';
import { mulberry32 } from '../../src/disk/faulty-file';

/** Deterministic PRNG (mulberry32, the one FaultyFile uses): a failing seed replays exactly. */
export const rng: (seed: number) => () => number = mulberry32;

export type Op =
  | { kind: 'write'; off: number; len: number; byte: number }
  | { kind: 'zero'; off: number; len: number; unmap: boolean }
  | { kind: 'discard'; off: number; len: number }
  | { kind: 'flush' };

/** Ops on 512-byte sectors inside `size`, lengths from 512 B to `maxClusters` clusters. */
export function makeOps(seed: number, n: number, size: number, clusterSize: number, opts: { zero?: boolean; discard?: boolean; maxClusters?: number } = {}): Op[] {
  const r = rng(seed);
  const ops: Op[] = [];
  const maxLen = Math.min(size, (opts.maxClusters ?? 3) * clusterSize);
  for (let i = 0; i < n; i++) {
    const x = r();
    if (x < 0.05) {
      ops.push({ kind: 'flush' });
      continue;
    }
    const sectors = 1 + Math.floor(r() * (maxLen / 512));
    const len = sectors * 512;
    // Bias towards a few hot clusters so writes overlap and COW paths are hit.
    const hot = r() < 0.5;
    const span = hot ? Math.min(size, 8 * clusterSize) : size;
    const off = Math.floor((r() * Math.max(1, span - len)) / 512) * 512;
    if (opts.zero && x < 0.2) ops.push({ kind: 'zero', off, len, unmap: r() < 0.5 });
    else if (opts.discard && x < 0.3) ops.push({ kind: 'discard', off, len });
    else ops.push({ kind: 'write', off, len, byte: 1 + Math.floor(r() * 254) });
  }
  return ops;
}

/**
 * Applies ops to the disk (sequentially, or up to `depth` writes in flight) and to the mirror.
 * Discard only changes whole clusters in the mirror (on partial clusters it is advisory); where a
 * discarded cluster does not read as zero (v2 over a backing file), pass `discardMirror`.
 */
export async function applyOps(disk: DiskImage, mirror: Uint8Array, ops: readonly Op[], opts: { clusterSize: number; depth?: number; discardMirror?: (off: number, len: number) => void } = { clusterSize: 65536 }): Promise<void> {
  const cs = opts.clusterSize;
  const depth = opts.depth ?? 1;
  // In-flight writes with their byte ranges: a guest never has two overlapping writes in flight
  // (their order would be undefined), so a write waits for the in-flight ones it overlaps.
  const inflight = new Map<Promise<void>, [number, number]>();
  const drain = async (): Promise<void> => {
    await Promise.all(inflight.keys());
  };
  for (const op of ops) {
    let p: Promise<void>;
    if (op.kind === 'flush') {
      await drain();
      p = disk.flush();
    } else if (op.kind === 'write') {
      const overlapping = [...inflight].filter(([, [o, l]]) => o < op.off + op.len && op.off < o + l).map(([q]) => q);
      if (overlapping.length > 0) await Promise.all(overlapping);
      const buf = new Uint8Array(op.len).fill(op.byte);
      mirror.fill(op.byte, op.off, op.off + op.len);
      p = disk.writeSector(op.off / 512, buf).then(() => undefined);
    } else if (op.kind === 'zero') {
      await drain();
      mirror.fill(0, op.off, op.off + op.len);
      p = disk.writeZeroes(op.off / 512, op.len / 512, op.unmap);
    } else {
      await drain();
      const first = Math.ceil(op.off / cs) * cs;
      const last = Math.floor((op.off + op.len) / cs) * cs;
      if (last > first) (opts.discardMirror ?? ((o, l) => mirror.fill(0, o, o + l)))(first, last - first);
      p = disk.discard(op.off / 512, op.len / 512);
    }
    if (depth <= 1 || op.kind !== 'write') {
      await p;
    } else {
      inflight.set(p, [op.off, op.len]);
      p.finally(() => inflight.delete(p)).catch(() => undefined);
      if (inflight.size >= depth) await Promise.race(inflight.keys());
    }
  }
  await drain();
}

/** Applies `ops` to the mirror only (for ops that qemu-io runs on the image). */
export function applyToMirror(mirror: Uint8Array, ops: readonly Op[], clusterSize: number): void {
  for (const op of ops) {
    if (op.kind === 'write') mirror.fill(op.byte, op.off, op.off + op.len);
    else if (op.kind === 'zero') mirror.fill(0, op.off, op.off + op.len);
    else if (op.kind === 'discard') {
      const first = Math.ceil(op.off / clusterSize) * clusterSize;
      const last = Math.floor((op.off + op.len) / clusterSize) * clusterSize;
      if (last > first) mirror.fill(0, first, last);
    }
  }
}

/** `qemu-img check` exit code and output. */
export function qemuCheck(img: string, fmt = 'qcow2'): { status: number; out: string } {
  const r = run('qemu-img', ['check', '-f', fmt, img]);
  return { status: r.status, out: r.stdout + r.stderr };
}

/** `qemu-img compare` of the image against a raw mirror written to `rawPath`. */
export function qemuCompare(img: string, mirror: Uint8Array, rawPath: string, fmt = 'qcow2'): { status: number; out: string } {
  fs.writeFileSync(rawPath, mirror);
  const r = run('qemu-img', ['compare', '-f', fmt, '-F', 'raw', img, rawPath]);
  return { status: r.status, out: r.stdout + r.stderr };
}
