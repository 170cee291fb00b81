/**
 * raw images: guest offset = file offset. Two ops tables: read-write and read-only (the read-only
 * one rejects writes, discards and write-zeroes with E_DISK_READONLY before touching the file).
 *
 * The virtual size is the file size rounded up to a whole sector, as QEMU's raw driver reports it;
 * the bytes between the end of the file and the end of that sector read as zeroes.
 */
import { DiskError } from '../errors';
import { DiskImage } from './disk-image';
import type { ImageFile } from './file';
import type { BlockStatus, DiskHandle, DiskImageOps, ImageDescription } from './types';
import { SECTOR_SIZE } from './types';
import type { ByteReader } from './qcow/chain';

/** State of an open raw image (`DiskImage.priv`). */
export class RawState implements ByteReader {
  readonly path: string;
  readonly file: ImageFile;
  readonly size: number;

  constructor(path: string, file: ImageFile, size: number) {
    this.path = path;
    this.file = file;
    this.size = size;
  }

  async readAt(offset: number, buf: Uint8Array): Promise<void> {
    const n = offset < this.size ? await this.file.read(buf, offset) : 0;
    if (n < buf.length) buf.fill(0, n);
  }

  /** Data, or a hole of the host file (zero, as qemu's file driver reports it via SEEK_DATA). */
  blockStatus(offset: number, length: number): BlockStatus {
    const n = Math.min(length, this.size - offset);
    const e = this.file.extent?.(offset, n);
    const hole = e !== undefined && !e.data;
    return { length: e?.length ?? n, present: true, zero: hole, data: !hole, depth: 0, offset, filename: this.path };
  }

  describe(): ImageDescription {
    return { format: 'raw', virtualSize: this.size, dirty: false };
  }
}

const ZERO_CHUNK = 1 << 20;
let zeroChunk: Uint8Array | undefined;

function readSector(disk: DiskHandle<RawState>, sector: number, buf: Uint8Array): Promise<number> {
  const s = disk.priv;
  return s.file.read(buf, sector * SECTOR_SIZE).then((n) => {
    if (n < buf.length) buf.fill(0, n); // the last partial sector of a file whose size is not a multiple of 512
    return buf.length;
  });
}

async function close(disk: DiskHandle<RawState>): Promise<void> {
  await disk.priv.file.close();
}

/** The read-write raw ops table. */
export const rawOps: DiskImageOps<RawState> = {
  name: 'raw',
  readSector,
  async writeSector(disk, sector, buf) {
    await disk.priv.file.write(buf, sector * SECTOR_SIZE);
    return buf.length;
  },
  flush(disk) {
    return disk.priv.file.sync();
  },
  async close(disk) {
    try {
      await disk.priv.file.sync();
    } finally {
      await close(disk);
    }
  },
  async writeZeroes(disk, sector, count) {
    zeroChunk ??= new Uint8Array(ZERO_CHUNK);
    let off = sector * SECTOR_SIZE;
    const end = off + count * SECTOR_SIZE;
    while (off < end) {
      const n = Math.min(ZERO_CHUNK, end - off);
      await disk.priv.file.write(n === ZERO_CHUNK ? zeroChunk : zeroChunk.subarray(0, n), off);
      off += n;
    }
  },
  blockStatus(disk, offset, length) {
    return Promise.resolve(disk.priv.blockStatus(offset, length));
  },
  describe(disk) {
    return disk.priv.describe();
  },
};

function rejectReadOnly(disk: DiskHandle<RawState>, what: string): Promise<never> {
  return Promise.reject(new DiskError('E_DISK_READONLY', `Cannot ${what} ${disk.path}: the image is open read-only`));
}

/** The read-only raw ops table. */
export const rawReadOnlyOps: DiskImageOps<RawState> = {
  name: 'raw-ro',
  readSector,
  writeSector(disk) {
    return rejectReadOnly(disk, 'write');
  },
  flush() {
    return Promise.resolve();
  },
  close,
  discard(disk) {
    return rejectReadOnly(disk, 'discard');
  },
  writeZeroes(disk) {
    return rejectReadOnly(disk, 'write zeroes to');
  },
  blockStatus(disk, offset, length) {
    return Promise.resolve(disk.priv.blockStatus(offset, length));
  },
  describe(disk) {
    return disk.priv.describe();
  },
};

/** Wraps an open file as a raw image (read-only when the file or `readonly` says so). */
export async function openRaw(file: ImageFile, opts: { path: string; readonly: boolean }): Promise<DiskImage<RawState>> {
  let size: number;
  try {
    size = await file.size();
  } catch (e) {
    await file.close().catch(() => undefined);
    throw e;
  }
  const rounded = Math.ceil(size / SECTOR_SIZE) * SECTOR_SIZE;
  const ro = opts.readonly || !file.writable;
  return new DiskImage<RawState>({ path: opts.path, format: 'raw', size: rounded, readonly: ro, ops: ro ? rawReadOnlyOps : rawOps, priv: new RawState(opts.path, file, rounded) });
}
