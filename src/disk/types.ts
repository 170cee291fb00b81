/**
 * The public disk-image contract (ARCHITECTURE.md, "The disk-image API").
 *
 * One `DiskImageOps` table per backend variant (raw read-write, raw read-only, qcow2 read-only,
 * qcow2 read-write, ...), as kvmtool's `struct disk_image_operations`. Choosing a variant means
 * choosing a table, never a runtime branch inside one.
 *
 * Obligations on every implementation:
 * - Sectors are 512 bytes; `buf.length` is a multiple of 512 (the DiskImage wrapper checks this
 *   and the range before calling the table, but tables must not rely on it for memory safety).
 * - A request that crosses the end of the disk, a corrupt table entry or an I/O error rejects
 *   with a `DiskError`. It is never reported as success and never leaves a buffer half-filled
 *   silently: on rejection the caller must treat the buffer contents as undefined.
 * - Implementations must not retain a reference to `buf` after the returned promise settles.
 * - Concurrent calls are allowed (many requests in flight); the table serialises what it must.
 * - After `close()` resolves, every other call rejects with `E_DISK_CLOSED`.
 */
export const SECTOR_SIZE = 512;
export const SECTOR_SHIFT = 9;

export type ImageFormat = 'raw' | 'qcow' | 'qcow2';

/**
 * What an ops table sees of the image it serves: its identity and its private state (kvmtool's
 * `disk->priv`). `DiskImage` implements it; keeping the table's view this narrow is what lets
 * this module stand below `disk-image.ts` instead of importing it back.
 */
export interface DiskHandle<P = unknown> {
  readonly path: string;
  readonly format: ImageFormat;
  /** Virtual size in bytes. */
  readonly size: number;
  readonly readonly: boolean;
  readonly priv: P;
}

export interface DiskImageOps<P = unknown> {
  /** Name of this variant, for messages and `vblk info` ("raw", "qcow2-ro", ...). */
  readonly name: string;
  /** Reads `buf.length` bytes at `sector * 512`; resolves to the number of bytes read. */
  readSector(disk: DiskHandle<P>, sector: number, buf: Uint8Array): Promise<number>;
  /** Writes `buf` at `sector * 512`; resolves to the number of bytes written. */
  writeSector(disk: DiskHandle<P>, sector: number, buf: Uint8Array): Promise<number>;
  /** Makes every write that has resolved so far durable (fdatasync of data and metadata). */
  flush(disk: DiskHandle<P>): Promise<void>;
  /** Flushes and releases the host file(s). Idempotent at the DiskImage level. */
  close(disk: DiskHandle<P>): Promise<void>;
  /**
   * Optional: tell the image `count` sectors are no longer needed. As with virtio-blk DISCARD and
   * QEMU, the contents afterwards are unspecified: whole clusters may be deallocated (reading as
   * zeroes or as the backing file) while partial clusters keep their old data. Callers that need
   * zeroes use `writeZeroes`.
   */
  discard?(disk: DiskHandle<P>, sector: number, count: number): Promise<void>;
  /** Optional: make `count` sectors read as zeroes; `unmap` allows deallocation. */
  writeZeroes?(disk: DiskHandle<P>, sector: number, count: number, unmap: boolean): Promise<void>;
  /** Optional: allocation status of the range starting at `offset` (bytes), like `qemu-img map`. */
  blockStatus?(disk: DiskHandle<P>, offset: number, length: number): Promise<BlockStatus>;
  /** Optional: format-specific facts for `vblk info`. */
  describe?(disk: DiskHandle<P>): ImageDescription;
}

/** One run of `qemu-img map`-like status, starting at the requested offset. */
export interface BlockStatus {
  /** Bytes from the requested offset that share this status (> 0, may be less than asked). */
  readonly length: number;
  /** Some layer of the chain has this range (false: no layer has it; reads as zeroes). */
  readonly present: boolean;
  /** Reads as zeroes. */
  readonly zero: boolean;
  /** Backed by data in a host file. */
  readonly data: boolean;
  /** Depth in the backing chain of the layer that answered (0 = this image). */
  readonly depth: number;
  /** Host file offset of the data, when it is stored uncompressed. */
  readonly offset?: number;
  /** Name of the file that holds it (for map --output=json "filename"). */
  readonly filename?: string;
}

/** What `vblk info` prints; fields mirror `qemu-img info --output=json`. */
export interface ImageDescription {
  readonly format: ImageFormat;
  readonly virtualSize: number;
  readonly actualSize?: number;
  readonly clusterSize?: number;
  readonly backingFile?: string;
  readonly backingFormat?: string;
  readonly fullBackingFilename?: string;
  readonly dirty?: boolean;
  readonly formatSpecific?: Readonly<Record<string, unknown>>;
}

export interface OpenOptions {
  readonly readonly?: boolean;
  readonly format?: ImageFormat;
}
