/**
 * Byte-granular reads through a backing chain.
 *
 * Every ops table in vblk's own formats keeps a `priv` that implements `ByteReader`, so an overlay
 * reads its backing file at any byte offset (a backing file's size need not be a multiple of 512
 * or of the overlay's cluster size), and bytes past the backing file's end read as zeroes
 * (qcow2.rst: "the backing file is shorter than the image: the rest reads as zeroes").
 */
import { DiskError } from '../../errors';
import type { DiskImage } from '../disk-image';
import type { ImageFile } from '../file';
import type { BlockStatus, DiskImageOps, ImageDescription } from '../types';
import { SECTOR_SIZE } from '../types';

/** Implemented by the private state of raw, qcow and qcow2 images. */
export interface ByteReader {
  /** Fills `buf` with the virtual contents at `offset`; bytes past the virtual size read as zero. */
  readAt(offset: number, buf: Uint8Array): Promise<void>;
}

function isByteReader(p: unknown): p is ByteReader {
  return typeof p === 'object' && p !== null && typeof (p as { readAt?: unknown }).readAt === 'function';
}

/**
 * Reads `buf.length` bytes at byte `offset` of `disk`; the part past `disk.size` reads as zeroes.
 * Uses the image's `ByteReader` when it has one, else sector reads through a bounce buffer.
 */
export async function readBytesAt(disk: DiskImage, offset: number, buf: Uint8Array): Promise<void> {
  if (isByteReader(disk.priv)) return disk.priv.readAt(offset, buf);
  const inside = Math.max(0, Math.min(buf.length, disk.size - offset));
  if (inside < buf.length) buf.fill(0, inside);
  if (inside === 0) return;
  const first = Math.floor(offset / SECTOR_SIZE);
  const last = Math.ceil((offset + inside) / SECTOR_SIZE);
  const lastWhole = Math.min(last, disk.sectors);
  if (offset % SECTOR_SIZE === 0 && inside % SECTOR_SIZE === 0) {
    await disk.readSector(first, buf.subarray(0, inside));
    return;
  }
  const bounce = new Uint8Array((last - first) * SECTOR_SIZE);
  if (lastWhole > first) await disk.readSector(first, bounce.subarray(0, (lastWhole - first) * SECTOR_SIZE));
  const skip = offset - first * SECTOR_SIZE;
  buf.set(bounce.subarray(skip, skip + inside), 0);
}

/**
 * Block status of `disk` at `offset` as seen from an overlay `depth` levels above it; past the
 * backing file's end the range is "not present, zero" at the overlay's own depth (as qemu-img map).
 */
export async function backingStatus(disk: DiskImage, offset: number, length: number, depth: number): Promise<BlockStatus> {
  const s = await disk.blockStatus(offset, length);
  return { ...s, depth: s.depth + depth };
}

/** The private state of a read-only layered image (qcow, qcow2): what `layeredReadOnlyOps` needs. */
export interface LayeredState extends ByteReader {
  readonly file: ImageFile;
  readonly backing: DiskImage | undefined;
  blockStatus(offset: number, length: number): Promise<BlockStatus>;
  describe(): ImageDescription;
}

/** Closes an image's backing chain, then its own file (also when the backing close fails). */
export async function closeLayered(s: { readonly file: ImageFile; readonly backing: DiskImage | undefined }): Promise<void> {
  try {
    if (s.backing) await s.backing.close();
  } finally {
    await s.file.close();
  }
}

/**
 * The read-only ops table of a layered format: reads through `readAt`, writes rejected with
 * E_DISK_READONLY, flush a no-op, close closes the backing chain too. One per format (`name`:
 * "qcow-ro", ...), since a variant is a table, not a runtime branch.
 */
export function layeredReadOnlyOps<S extends LayeredState>(name: string): DiskImageOps<S> {
  return {
    name,
    readSector(disk, sector, buf) {
      return disk.priv.readAt(sector * SECTOR_SIZE, buf).then(() => buf.length);
    },
    writeSector(disk) {
      return Promise.reject(new DiskError('E_DISK_READONLY', `Cannot write ${disk.path}: the image is open read-only`));
    },
    flush() {
      return Promise.resolve();
    },
    close(disk) {
      return closeLayered(disk.priv);
    },
    blockStatus(disk, offset, length) {
      return disk.priv.blockStatus(offset, length);
    },
    describe(disk) {
      return disk.priv.describe();
    },
  };
}

/** Runs `open` over `file`, closing the file if it fails (the opener contract of src/disk/open.ts). */
export async function closingOnFailure<T>(file: ImageFile, open: () => Promise<T>): Promise<T> {
  try {
    return await open();
  } catch (e) {
    await file.close().catch(() => undefined);
    throw e;
  }
}

/**
 * Writes `buf` at byte `off` one cluster-sized piece at a time, the pieces in parallel. Rejects
 * with the first failure only after every piece has settled, so no write of this request is
 * still running when the caller sees the error.
 */
export async function writeByCluster(
  off: number,
  buf: Uint8Array,
  clusterSize: number,
  writeOne: (off: number, piece: Uint8Array) => Promise<void>,
): Promise<void> {
  if ((off % clusterSize) + buf.length <= clusterSize) return writeOne(off, buf);
  const parts: Promise<void>[] = [];
  for (let pos = 0; pos < buf.length; ) {
    const cur = off + pos;
    const n = Math.min(buf.length - pos, clusterSize - (cur % clusterSize));
    parts.push(writeOne(cur, buf.subarray(pos, pos + n)));
    pos += n;
  }
  const results = await Promise.allSettled(parts);
  const bad = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (bad) throw bad.reason;
}
