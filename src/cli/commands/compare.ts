/**
 * `vblk compare [-f FMT] [-F FMT] [-s] [-q] [-p] A B`: compares the guest-visible contents of two
 * images like `qemu-img compare`. Exit 0 identical, 1 different (`Content mismatch at offset N!`,
 * N the first differing 512-byte sector's offset), 2 on error (cannot open or read).
 * Images of different sizes: the extra part of the larger one must read as zeroes
 * (`Warning: Image size mismatch!`); with -s a size mismatch is a difference.
 */
import type { DiskImage } from '../../disk/disk-image';
import { openDiskImage } from '../../disk/open';
import { readBytesAt } from '../../disk/qcow/chain';
import { parseArgs, parseFormat } from '../args';
import { UsageError, progressPrinter, type Command } from '../command';

const CHUNK = 1 << 20;

/** First offset (rounded down to 512) where `a` and `b` differ, or -1. */
function firstDiff(a: Uint8Array, b: Uint8Array, n: number): number {
  const ba = Buffer.from(a.buffer, a.byteOffset, n);
  const bb = Buffer.from(b.buffer, b.byteOffset, n);
  if (ba.equals(bb)) return -1;
  for (let s = 0; s < n; s += 512) {
    const e = Math.min(n, s + 512);
    if (!ba.subarray(s, e).equals(bb.subarray(s, e))) return s;
  }
  return -1;
}

function firstNonZero(a: Uint8Array, n: number): number {
  for (let i = 0; i < n; i++) if (a[i] !== 0) return i - (i % 512);
  return -1;
}

/**
 * Compares two open images; resolves to the first differing offset or -1. `progress` gets the
 * bytes compared so far (of the larger size).
 */
export async function compareImages(a: DiskImage, b: DiskImage, progress?: (done: number) => void): Promise<number> {
  const common = Math.min(a.size, b.size);
  const bufA = new Uint8Array(CHUNK);
  const bufB = new Uint8Array(CHUNK);
  for (let off = 0; off < common; off += CHUNK) {
    const n = Math.min(CHUNK, common - off);
    const sa = await a.blockStatus(off, n);
    const sb = await b.blockStatus(off, n);
    // Both read as zeroes over the shorter run: nothing to read.
    if (sa.zero && sb.zero) {
      const skip = Math.min(sa.length, sb.length);
      if (skip < n) off -= CHUNK - skip; // continue right after the zero run
      progress?.(off + CHUNK);
      continue;
    }
    await Promise.all([readBytesAt(a, off, bufA.subarray(0, n)), readBytesAt(b, off, bufB.subarray(0, n))]);
    const d = firstDiff(bufA, bufB, n);
    if (d >= 0) return off + d;
    progress?.(off + n);
  }
  const longer = a.size > b.size ? a : b;
  for (let off = common; off < longer.size; off += CHUNK) {
    const n = Math.min(CHUNK, longer.size - off);
    await readBytesAt(longer, off, bufA.subarray(0, n));
    const d = firstNonZero(bufA, n);
    if (d >= 0) return off + d;
    progress?.(off + n);
  }
  return -1;
}

export const compareCommand: Command = {
  name: 'compare',
  summary: 'compare the contents of two images (exit 0 same, 1 different, 2 error)',
  usage: 'compare [-f FMT] [-F FMT] [-s] [-q] [-p] A B',
  errorExitCode: 2,
  async run(argv, io) {
    const a = parseArgs(argv, { values: 'fF', flags: 'sqpU' });
    const [pa, pb, extra] = a.positional;
    if (pa === undefined || pb === undefined || extra !== undefined) throw new UsageError('compare needs exactly two images');
    const quiet = a.has('q');
    const fa = parseFormat(a.get('f'));
    const fb = parseFormat(a.get('F')) ?? fa;
    const da = await openDiskImage(pa, { readonly: true, ...(fa ? { format: fa } : {}) });
    try {
      const db = await openDiskImage(pb, { readonly: true, ...(fb ? { format: fb } : {}) });
      try {
        if (da.size !== db.size) {
          if (a.has('s')) {
            if (!quiet) io.stdout.write('Strict mode: Image size mismatch!\n');
            return 1;
          }
          if (!quiet) io.stdout.write('Warning: Image size mismatch!\n');
        }
        const prog = a.has('p') && !quiet ? progressPrinter(io, Math.max(da.size, db.size)) : undefined;
        const d = await compareImages(da, db, prog ? (done): void => prog.update(done) : undefined);
        prog?.finish();
        if (d >= 0) {
          if (!quiet) io.stdout.write(`Content mismatch at offset ${d}!\n`);
          return 1;
        }
        if (!quiet) io.stdout.write('Images are identical.\n');
        return 0;
      } finally {
        await db.close();
      }
    } finally {
      await da.close();
    }
  },
};
