import { DiskError, hex } from '../errors';
import type { DiskHandle, DiskImageOps, ImageFormat, BlockStatus, ImageDescription } from './types';
import { SECTOR_SIZE } from './types';

/**
 * An open disk image: the format's ops table plus its private state (`priv`, as kvmtool's
 * `disk->priv`). The methods here do the checks every format needs (range, alignment, closed
 * state) once, then call the table.
 *
 * @example
 *   const disk = await openDiskImage('base.qcow2', { readonly: true });
 *   const buf = new Uint8Array(4096);
 *   await disk.readSector(8, buf);
 *   await disk.close();
 */
export class DiskImage<P = unknown> implements DiskHandle<P> {
  readonly path: string;
  readonly format: ImageFormat;
  /** Virtual size in bytes. */
  readonly size: number;
  readonly readonly: boolean;
  readonly ops: DiskImageOps<P>;
  readonly priv: P;
  #closed = false;
  #closing: Promise<void> | undefined;

  constructor(init: { path: string; format: ImageFormat; size: number; readonly: boolean; ops: DiskImageOps<P>; priv: P }) {
    if (!Number.isSafeInteger(init.size) || init.size < 0) {
      throw new DiskError('E_QCOW_UNSUPPORTED', `Cannot open ${init.path}: virtual size ${init.size} is not a safe integer`);
    }
    this.path = init.path;
    this.format = init.format;
    this.size = init.size;
    this.readonly = init.readonly;
    this.ops = init.ops;
    this.priv = init.priv;
  }

  /** Number of whole 512-byte sectors (virtio-blk capacity). */
  get sectors(): number {
    return Math.floor(this.size / SECTOR_SIZE);
  }

  get closed(): boolean {
    return this.#closed;
  }

  async readSector(sector: number, buf: Uint8Array): Promise<number> {
    this.#checkRange('read', sector, buf.length);
    return this.ops.readSector(this, sector, buf);
  }

  async writeSector(sector: number, buf: Uint8Array): Promise<number> {
    this.#checkRange('write', sector, buf.length);
    this.#checkWritable('write');
    return this.ops.writeSector(this, sector, buf);
  }

  async flush(): Promise<void> {
    this.#checkOpen('flush');
    return this.ops.flush(this);
  }

  get canDiscard(): boolean {
    return this.ops.discard !== undefined;
  }

  get canWriteZeroes(): boolean {
    return this.ops.writeZeroes !== undefined;
  }

  async discard(sector: number, count: number): Promise<void> {
    this.#checkRange('discard', sector, count * SECTOR_SIZE);
    this.#checkWritable('discard');
    if (!this.ops.discard) throw new DiskError('E_DISK_UNSUPPORTED', `Cannot discard: ${this.ops.name} does not support discard`);
    return this.ops.discard(this, sector, count);
  }

  async writeZeroes(sector: number, count: number, unmap: boolean): Promise<void> {
    this.#checkRange('write zeroes', sector, count * SECTOR_SIZE);
    this.#checkWritable('write zeroes');
    if (this.ops.writeZeroes) return this.ops.writeZeroes(this, sector, count, unmap);
    // Generic fallback: write a zero buffer in bounded chunks.
    return this.#writeZeroBuffers(sector, count);
  }

  async #writeZeroBuffers(sector: number, count: number): Promise<void> {
    const chunkSectors = 2048;
    const zero = new Uint8Array(Math.min(count, chunkSectors) * SECTOR_SIZE);
    for (let s = 0; s < count; s += chunkSectors) {
      const n = Math.min(chunkSectors, count - s);
      await this.ops.writeSector(this, sector + s, n === chunkSectors ? zero : zero.subarray(0, n * SECTOR_SIZE));
    }
  }

  /** Allocation status at `offset` (bytes); a format without the op reports everything as data. */
  async blockStatus(offset: number, length: number): Promise<BlockStatus> {
    this.#checkOpen('query block status');
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length <= 0 || offset + length > this.size) {
      throw new DiskError('E_DISK_RANGE', `Cannot query block status: range ${offset}+${length} is outside the disk (size ${this.size})`);
    }
    if (this.ops.blockStatus) return this.ops.blockStatus(this, offset, length);
    return { length, present: true, zero: false, data: true, depth: 0 };
  }

  describe(): ImageDescription {
    return this.ops.describe ? this.ops.describe(this) : { format: this.format, virtualSize: this.size };
  }

  /** Flushes and closes; safe to call more than once. */
  close(): Promise<void> {
    if (this.#closing) return this.#closing;
    this.#closing = this.ops.close(this).finally(() => {
      this.#closed = true;
    });
    return this.#closing;
  }

  #checkOpen(what: string): void {
    if (this.#closed || this.#closing) throw new DiskError('E_DISK_CLOSED', `Cannot ${what}: ${this.path} is closed`);
  }

  #checkWritable(what: string): void {
    if (this.readonly) throw new DiskError('E_DISK_READONLY', `Cannot ${what}: ${this.path} is open read-only`);
  }

  #checkRange(what: string, sector: number, bytes: number): void {
    this.#checkOpen(what);
    if (!Number.isSafeInteger(sector) || sector < 0) {
      throw new DiskError('E_DISK_RANGE', `Cannot ${what}: sector ${sector} is not a non-negative safe integer`);
    }
    if (bytes % SECTOR_SIZE !== 0) {
      throw new DiskError('E_DISK_RANGE', `Cannot ${what}: length ${bytes} is not a multiple of ${SECTOR_SIZE}`);
    }
    const start = sector * SECTOR_SIZE;
    if (!Number.isSafeInteger(start) || start + bytes > this.size) {
      throw new DiskError('E_DISK_RANGE', `Cannot ${what}: bytes ${hex(start)}+${hex(bytes)} are past the end of the disk (size ${hex(this.size)})`, {
        sector,
        bytes,
        size: this.size,
      });
    }
  }
}
