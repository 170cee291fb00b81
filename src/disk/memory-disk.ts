import { DiskImage } from './disk-image';
import type { DiskImageOps } from './types';
import { SECTOR_SIZE } from './types';
import { DiskError } from '../errors';

/**
 * An in-memory disk: a DiskImageOps table over a Buffer, for tests, for the reference model of
 * the property tests and for users who want to exercise a VMM without a file. It can delay each
 * operation by a random number of event-loop turns, so concurrent requests complete in a random
 * order (as a real disk under load would), and it can fail chosen operations.
 */

/** Which operation a fault hook is asked about. */
export type MemoryDiskOp = 'read' | 'write' | 'flush' | 'discard' | 'writeZeroes';

export interface MemoryDiskOptions {
  /** Virtual size in bytes (a multiple of 512). */
  readonly size: number;
  readonly readonly?: boolean;
  /** Name shown as the image path (and default GET_ID serial). Default "memory". */
  readonly path?: string;
  /** Offer discard (default true). Without it the table has no `discard` op. */
  readonly discard?: boolean;
  /**
   * Delay every operation by 0..maxDelayTurns event-loop turns (setImmediate), chosen by `random`,
   * which makes concurrent requests complete in a random order. Default 0 (complete in order).
   */
  readonly maxDelayTurns?: number;
  /** Random source in [0, 1) for delays (pass a seeded one for reproducible tests). Default Math.random. */
  readonly random?: () => number;
  /** Return true to make that operation fail with E_DISK_IO (fault injection). */
  readonly fail?: (op: MemoryDiskOp, sector: number, count: number) => boolean;
  /** Initial contents (copied); default zeroes. */
  readonly contents?: Uint8Array;
}

/** Private state of a memory disk (`disk.priv`). */
export interface MemoryDiskState {
  readonly data: Buffer;
  readonly maxDelayTurns: number;
  readonly random: () => number;
  readonly fail: ((op: MemoryDiskOp, sector: number, count: number) => boolean) | undefined;
  /** Operations started, by kind (for tests that check what reached the disk). */
  readonly counts: Record<MemoryDiskOp, number>;
  closed: boolean;
}

function delay(st: MemoryDiskState): Promise<void> | undefined {
  if (st.maxDelayTurns <= 0) return undefined;
  let turns = Math.floor(st.random() * (st.maxDelayTurns + 1));
  if (turns === 0) return undefined;
  return new Promise((resolve) => {
    const step = (): void => {
      if (--turns <= 0) resolve();
      else setImmediate(step);
    };
    setImmediate(step);
  });
}

function check(disk: DiskImage<MemoryDiskState>, op: MemoryDiskOp, sector: number, count: number): void {
  const st = disk.priv;
  if (st.closed) throw new DiskError('E_DISK_CLOSED', `Cannot ${op}: ${disk.path} is closed`);
  st.counts[op]++;
  if (st.fail?.(op, sector, count)) throw new DiskError('E_DISK_IO', `Cannot ${op} ${disk.path}: injected fault at sector ${sector}`);
  if (sector * SECTOR_SIZE + count * SECTOR_SIZE > st.data.length) {
    throw new DiskError('E_DISK_RANGE', `Cannot ${op} ${disk.path}: sectors ${sector}+${count} are past the end`);
  }
}

// The data moves when the operation completes (after the delay), like a real disk: a read
// started before a write but finishing after it sees the new data.
const base = {
  async readSector(disk: DiskImage<MemoryDiskState>, sector: number, buf: Uint8Array): Promise<number> {
    await delay(disk.priv);
    check(disk, 'read', sector, buf.length / SECTOR_SIZE);
    const off = sector * SECTOR_SIZE;
    buf.set(disk.priv.data.subarray(off, off + buf.length));
    return buf.length;
  },
  async writeSector(disk: DiskImage<MemoryDiskState>, sector: number, buf: Uint8Array): Promise<number> {
    await delay(disk.priv);
    check(disk, 'write', sector, buf.length / SECTOR_SIZE);
    disk.priv.data.set(buf, sector * SECTOR_SIZE);
    return buf.length;
  },
  async flush(disk: DiskImage<MemoryDiskState>): Promise<void> {
    await delay(disk.priv);
    check(disk, 'flush', 0, 0);
  },
  close(disk: DiskImage<MemoryDiskState>): Promise<void> {
    disk.priv.closed = true;
    return Promise.resolve();
  },
  async writeZeroes(disk: DiskImage<MemoryDiskState>, sector: number, count: number): Promise<void> {
    await delay(disk.priv);
    check(disk, 'writeZeroes', sector, count);
    disk.priv.data.fill(0, sector * SECTOR_SIZE, (sector + count) * SECTOR_SIZE);
  },
};

/** Memory disk with discard (discarded sectors read as zeroes). */
export const memoryDiskOps: DiskImageOps<MemoryDiskState> = {
  name: 'memory',
  ...base,
  async discard(disk: DiskImage<MemoryDiskState>, sector: number, count: number): Promise<void> {
    await delay(disk.priv);
    check(disk, 'discard', sector, count);
    disk.priv.data.fill(0, sector * SECTOR_SIZE, (sector + count) * SECTOR_SIZE);
  },
};

/** Memory disk without discard (a device over it does not offer DISCARD). */
export const memoryDiskOpsNoDiscard: DiskImageOps<MemoryDiskState> = { name: 'memory-nodiscard', ...base };

/**
 * Creates an in-memory DiskImage.
 *
 * @example
 *   const disk = createMemoryDisk({ size: 1 << 20, maxDelayTurns: 3 });
 *   await disk.writeSector(0, new Uint8Array(512).fill(1));
 */
export function createMemoryDisk(opts: MemoryDiskOptions): DiskImage<MemoryDiskState> {
  if (!Number.isSafeInteger(opts.size) || opts.size < 0 || opts.size % SECTOR_SIZE !== 0) {
    throw new RangeError(`Cannot create memory disk: size ${opts.size} is not a multiple of ${SECTOR_SIZE}`);
  }
  const data = Buffer.alloc(opts.size);
  if (opts.contents) data.set(opts.contents.subarray(0, opts.size));
  const priv: MemoryDiskState = {
    data,
    maxDelayTurns: opts.maxDelayTurns ?? 0,
    random: opts.random ?? Math.random,
    fail: opts.fail,
    counts: { read: 0, write: 0, flush: 0, discard: 0, writeZeroes: 0 },
    closed: false,
  };
  return new DiskImage<MemoryDiskState>({
    path: opts.path ?? 'memory',
    format: 'raw',
    size: opts.size,
    readonly: opts.readonly ?? false,
    ops: opts.discard === false ? memoryDiskOpsNoDiscard : memoryDiskOps,
    priv,
  });
}
