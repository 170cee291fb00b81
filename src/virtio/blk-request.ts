import type { DiskImage } from '../disk/disk-image';
import { SECTOR_SIZE } from '../disk/types';
import type { DescriptorChain } from './chain';
import {
  BLK_DWZ_SEGMENT_SIZE,
  BLK_HEADER_SIZE,
  VIRTIO_BLK_ID_BYTES,
  VIRTIO_BLK_S,
  VIRTIO_BLK_T,
  VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
} from './blk-config';

/**
 * What a request needs from the device and queue that run it. The values are read when the
 * request is parsed, so a `writeback` change applies to requests popped after it.
 */
export interface BlkRequestHost {
  readonly disk: DiskImage;
  /** Capacity in 512-byte sectors. */
  readonly capacity: number;
  readonly readonly: boolean;
  /** Writes must be flushed before they complete (writeback = 0, or FLUSH not negotiated). */
  readonly writethrough: boolean;
  readonly discardEnabled: boolean;
  readonly writeZeroesEnabled: boolean;
  readonly maxDiscardSectors: number;
  readonly maxDiscardSeg: number;
  readonly maxWriteZeroesSectors: number;
  readonly maxWriteZeroesSeg: number;
  /** GET_ID answer, exactly 20 bytes (NUL-padded). */
  readonly serial: Buffer;
  /** Returns the chain to the driver: writes the used entry (head, usedLen). Called exactly once. */
  finish(head: number, usedLen: number): void;
}

/** Largest bounce buffer one request uses for data that is not 512-byte aligned per segment. */
const BOUNCE_CHUNK = 256 * 1024;

/** Position inside a list of guest data segments. */
interface SegmentCursor {
  seg: number;
  off: number;
}

/**
 * Copies `chunk.length` bytes between `chunk` and the guest segments `segs`, starting at `at`
 * (advanced past the bytes copied): into the guest when `toGuest`, out of it otherwise.
 */
function copySegments(segs: readonly Buffer[], at: SegmentCursor, chunk: Buffer, toGuest: boolean): void {
  for (let done = 0; done < chunk.length; ) {
    const b = segs[at.seg] as Buffer;
    const c = Math.min(b.length - at.off, chunk.length - done);
    if (toGuest) chunk.copy(b, at.off, done, done + c);
    else b.copy(chunk, done, at.off, at.off + c);
    done += c;
    at.off += c;
    if (at.off === b.length) {
      at.seg++;
      at.off = 0;
    }
  }
}

const enum Phase {
  Idle,
  Io,
  Flush,
}

/**
 * One virtio-blk request (spec 5.2.6): parsed from a descriptor chain without any assumption
 * about how header, data and status are split across descriptors ("frame-agnostic"): the header
 * is the first 16 readable bytes, the status is the last writable byte, and the data is the rest
 * of the readable bytes (OUT, DISCARD, WRITE_ZEROES) or of the writable bytes (IN, GET_ID).
 *
 * Objects are reused per head index; the completion callbacks are bound once at construction so
 * the hot path allocates no closures.
 */
export class BlkRequest {
  readonly #host: BlkRequestHost;
  #head = 0;
  #busy = false;
  #phase: Phase = Phase.Idle;
  #expected = 0;
  /** The data phase modifies the disk (OUT, DISCARD, WRITE_ZEROES): writethrough flushes after it. */
  #writing = false;
  /** Status byte location: the last writable byte of the chain. */
  #statusBuf: Buffer | undefined;
  #statusOff = 0;
  #usedLen = 0;
  /** Data segments of the request (region buffer, offset, length), reused across requests. */
  readonly #dBufs: Buffer[] = [];
  readonly #dOffs: number[] = [];
  readonly #dLens: number[] = [];
  #dCount = 0;
  #dataLen = 0;
  readonly #hdr = Buffer.alloc(BLK_HEADER_SIZE);
  readonly #onIo: (n: number) => void;
  readonly #onFlushed: () => void;
  readonly #onFail: (e: unknown) => void;
  /** Last error from the disk (for diagnostics; the guest only sees IOERR). */
  lastError: unknown = undefined;

  constructor(host: BlkRequestHost) {
    this.#host = host;
    this.#onIo = (n: number): void => this.#ioDone(n);
    this.#onFlushed = (): void => this.complete(VIRTIO_BLK_S.OK);
    this.#onFail = (e: unknown): void => {
      this.lastError = e;
      this.complete(VIRTIO_BLK_S.IOERR);
    };
  }

  get busy(): boolean {
    return this.#busy;
  }

  /**
   * Parses and starts the request carried by `chain`. Always ends (now or later) in exactly one
   * call of `host.finish(head, len)`.
   */
  start(chain: DescriptorChain): void {
    if (this.#busy) throw new RangeError(`Cannot start virtio-blk request on head ${chain.head}: already in flight`);
    this.#busy = true;
    this.#head = chain.head;
    this.#statusBuf = undefined;
    this.#dCount = 0;
    this.#dataLen = 0;
    this.lastError = undefined;
    try {
      this.#dispatch(chain);
    } catch (e) {
      // Only a disk whose method throws synchronously gets here (every guest-controlled check
      // completes the request itself). Nothing is in flight then, so the request can end now;
      // a request that already completed must not complete twice.
      if (!this.#busy) throw e;
      this.#onFail(e);
    }
  }

  #dispatch(chain: DescriptorChain): void {
    // Malformed chain, or no writable byte for the status: give the head back with length 0.
    if (chain.error !== undefined || chain.writableLength === 0) {
      this.#finishNoStatus();
      return;
    }
    const last = chain.count - 1;
    this.#statusBuf = chain.bufs[last];
    this.#statusOff = (chain.offs[last] as number) + (chain.lens[last] as number) - 1;
    this.#usedLen = chain.writableLength;
    if (chain.readableLength < BLK_HEADER_SIZE) {
      this.complete(VIRTIO_BLK_S.IOERR); // header missing, or not device-readable
      return;
    }
    const hdr = this.#header(chain);
    const ho = this.#hdrOff;
    // Each header field is read once: the guest may change its memory while we work.
    const type = hdr.readUInt32LE(ho);
    const sectorLo = hdr.readUInt32LE(ho + 8);
    const sectorHi = hdr.readUInt32LE(ho + 12);
    switch (type) {
      case VIRTIO_BLK_T.IN:
        this.#collectWritableData(chain);
        this.#readWrite(false, sectorLo, sectorHi);
        return;
      case VIRTIO_BLK_T.OUT:
        this.#collectReadableData(chain);
        this.#readWrite(true, sectorLo, sectorHi);
        return;
      case VIRTIO_BLK_T.FLUSH:
        this.#flushThenComplete();
        return;
      case VIRTIO_BLK_T.GET_ID:
        this.#collectWritableData(chain);
        this.#getId();
        return;
      case VIRTIO_BLK_T.DISCARD:
      case VIRTIO_BLK_T.WRITE_ZEROES:
        this.#collectReadableData(chain);
        this.#discardOrZero(type === VIRTIO_BLK_T.DISCARD);
        return;
      default:
        this.complete(VIRTIO_BLK_S.UNSUPP);
    }
  }

  /** The 16 header bytes, at `#hdrOff` of the returned buffer (a copy when they are split). */
  #hdrOff = 0;
  #header(chain: DescriptorChain): Buffer {
    if ((chain.lens[0] as number) >= BLK_HEADER_SIZE) {
      this.#hdrOff = chain.offs[0] as number;
      return chain.bufs[0] as Buffer;
    }
    let off = 0;
    for (let i = 0; i < chain.firstWritable && off < BLK_HEADER_SIZE; i++) {
      const n = Math.min(chain.lens[i] as number, BLK_HEADER_SIZE - off);
      const o = chain.offs[i] as number;
      (chain.bufs[i] as Buffer).copy(this.#hdr, off, o, o + n);
      off += n;
    }
    this.#hdrOff = 0;
    return this.#hdr;
  }

  #pushData(buf: Buffer, off: number, len: number): void {
    const n = this.#dCount;
    this.#dBufs[n] = buf;
    this.#dOffs[n] = off;
    this.#dLens[n] = len;
    this.#dCount = n + 1;
  }

  /** Data = readable bytes after the header. */
  #collectReadableData(chain: DescriptorChain): void {
    let skip = BLK_HEADER_SIZE;
    for (let i = 0; i < chain.firstWritable; i++) {
      const len = chain.lens[i] as number;
      if (skip >= len) {
        skip -= len;
        continue;
      }
      this.#pushData(chain.bufs[i] as Buffer, (chain.offs[i] as number) + skip, len - skip);
      skip = 0;
    }
    this.#dataLen = chain.readableLength - BLK_HEADER_SIZE;
  }

  /** Data = writable bytes before the status byte. */
  #collectWritableData(chain: DescriptorChain): void {
    const last = chain.count - 1;
    for (let i = chain.firstWritable; i < last; i++) this.#pushData(chain.bufs[i] as Buffer, chain.offs[i] as number, chain.lens[i] as number);
    const lastLen = chain.lens[last] as number;
    if (lastLen > 1) this.#pushData(chain.bufs[last] as Buffer, chain.offs[last] as number, lastLen - 1);
    this.#dataLen = chain.writableLength - 1;
  }

  /** A zero-copy view of data segment `i`. */
  #dataView(i: number): Buffer {
    const off = this.#dOffs[i] as number;
    return (this.#dBufs[i] as Buffer).subarray(off, off + (this.#dLens[i] as number));
  }

  /** Views of every data segment (slow paths). */
  #dataViews(): Buffer[] {
    const out: Buffer[] = [];
    for (let i = 0; i < this.#dCount; i++) out.push(this.#dataView(i));
    return out;
  }

  #readWrite(write: boolean, sectorLo: number, sectorHi: number): void {
    const host = this.#host;
    if (write && host.readonly) return this.complete(VIRTIO_BLK_S.IOERR);
    const len = this.#dataLen;
    if (len % SECTOR_SIZE !== 0) return this.complete(VIRTIO_BLK_S.IOERR);
    // A sector at or above 2^53 is far past any capacity; below it the sum is exact.
    if (sectorHi > 0x1f_ffff) return this.complete(VIRTIO_BLK_S.IOERR);
    const sector = sectorHi * 0x1_0000_0000 + sectorLo;
    if (sector + len / SECTOR_SIZE > host.capacity) return this.complete(VIRTIO_BLK_S.IOERR);
    if (len === 0) {
      if (write && host.writethrough) return this.#flushThenComplete();
      return this.complete(VIRTIO_BLK_S.OK);
    }
    this.#phase = Phase.Io;
    this.#writing = write;
    if (this.#dCount === 1) {
      // Hot path: one data buffer, handed to the disk as a zero-copy view of guest memory.
      this.#expected = len;
      const buf = this.#dataView(0);
      (write ? host.disk.writeSector(sector, buf) : host.disk.readSector(sector, buf)).then(this.#onIo, this.#onFail);
      return;
    }
    this.#expected = -1;
    this.#segmentedIo(write, sector).then(this.#onIo, this.#onFail);
  }

  /**
   * Several data buffers. When every buffer is a whole number of sectors, each goes to the disk
   * as its own zero-copy request (concurrently); otherwise data moves through a bounded bounce
   * buffer, chunk by chunk.
   */
  async #segmentedIo(write: boolean, sector: number): Promise<number> {
    const disk = this.#host.disk;
    const data = this.#dataViews();
    let aligned = true;
    for (const b of data) if (b.length % SECTOR_SIZE !== 0) aligned = false;
    if (aligned) {
      const ops: Promise<number>[] = [];
      let s = sector;
      for (const b of data) {
        ops.push(write ? disk.writeSector(s, b) : disk.readSector(s, b));
        s += b.length / SECTOR_SIZE;
      }
      const done = await Promise.allSettled(ops);
      let total = 0;
      for (let i = 0; i < done.length; i++) {
        const r = done[i] as PromiseSettledResult<number>;
        if (r.status === 'rejected') throw r.reason;
        if (r.value !== (data[i] as Buffer).length) return -1;
        total += r.value;
      }
      return total;
    }
    const total = this.#dataLen;
    const bounce = Buffer.allocUnsafe(Math.min(total, BOUNCE_CHUNK));
    const at: SegmentCursor = { seg: 0, off: 0 };
    for (let done = 0; done < total; ) {
      const n = Math.min(bounce.length, total - done);
      const chunk = n === bounce.length ? bounce : bounce.subarray(0, n);
      if (write) {
        copySegments(data, at, chunk, false);
        if ((await disk.writeSector(sector + done / SECTOR_SIZE, chunk)) !== n) return -1;
      } else {
        if ((await disk.readSector(sector + done / SECTOR_SIZE, chunk)) !== n) return -1;
        copySegments(data, at, chunk, true);
      }
      done += n;
    }
    return total;
  }

  #ioDone(n: number): void {
    if (this.#expected >= 0 ? n !== this.#expected : n < 0) {
      this.lastError = new Error(`short transfer: ${n} of ${this.#dataLen} bytes`);
      return this.complete(VIRTIO_BLK_S.IOERR);
    }
    if (this.#phase === Phase.Io && this.#writing && this.#host.writethrough) return this.#flushThenComplete();
    this.complete(VIRTIO_BLK_S.OK);
  }

  #flushThenComplete(): void {
    this.#phase = Phase.Flush;
    let flushed: Promise<void>;
    try {
      flushed = this.#host.disk.flush();
    } catch (e) {
      // Reached from the data phase's completion callback, where a throw would become an
      // unhandled rejection: end the request here instead.
      return this.#onFail(e);
    }
    flushed.then(this.#onFlushed, this.#onFail);
  }

  /**
   * GET_ID: the 20-byte NUL-padded serial, truncated to a shorter buffer. A longer buffer is
   * NUL-padded to its end, so that every byte the used length covers was written by the device
   * (spec 2.7.8.2: the driver may trust the first `len` bytes).
   */
  #getId(): void {
    const id = this.#host.serial;
    let off = 0;
    for (const b of this.#dataViews()) {
      const n = Math.max(0, Math.min(b.length, VIRTIO_BLK_ID_BYTES - off));
      if (n > 0) id.copy(b, 0, off, off + n);
      if (n < b.length) b.fill(0, n);
      off += b.length;
    }
    this.complete(VIRTIO_BLK_S.OK);
  }

  #discardOrZero(discard: boolean): void {
    const host = this.#host;
    if (discard ? !host.discardEnabled : !host.writeZeroesEnabled) return this.complete(VIRTIO_BLK_S.UNSUPP);
    if (host.readonly) return this.complete(VIRTIO_BLK_S.IOERR);
    const len = this.#dataLen;
    if (len === 0 || len % BLK_DWZ_SEGMENT_SIZE !== 0) return this.complete(VIRTIO_BLK_S.IOERR);
    const count = len / BLK_DWZ_SEGMENT_SIZE;
    if (count > (discard ? host.maxDiscardSeg : host.maxWriteZeroesSeg)) return this.complete(VIRTIO_BLK_S.UNSUPP);
    const maxSectors = discard ? host.maxDiscardSectors : host.maxWriteZeroesSectors;
    const segs = Buffer.allocUnsafe(len);
    let off = 0;
    for (const b of this.#dataViews()) {
      b.copy(segs, off);
      off += b.length;
    }
    // Validate every segment before touching the disk (the request is all or nothing as far as
    // the checks go).
    const ranges: { sector: number; count: number; unmap: boolean }[] = [];
    for (let i = 0; i < count; i++) {
      const o = i * BLK_DWZ_SEGMENT_SIZE;
      const lo = segs.readUInt32LE(o);
      const hi = segs.readUInt32LE(o + 4);
      const n = segs.readUInt32LE(o + 8);
      const flags = segs.readUInt32LE(o + 12);
      if ((flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0) return this.complete(VIRTIO_BLK_S.UNSUPP);
      const unmap = (flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0;
      if (discard && unmap) return this.complete(VIRTIO_BLK_S.UNSUPP); // spec 5.2.6.2
      if (n > maxSectors || hi > 0x1f_ffff) return this.complete(VIRTIO_BLK_S.IOERR);
      const sector = hi * 0x1_0000_0000 + lo;
      if (sector + n > host.capacity) return this.complete(VIRTIO_BLK_S.IOERR);
      ranges.push({ sector, count: n, unmap });
    }
    this.#phase = Phase.Io;
    this.#writing = true;
    this.#expected = -1;
    this.#runRanges(discard, ranges).then(this.#onIo, this.#onFail);
  }

  async #runRanges(discard: boolean, ranges: { sector: number; count: number; unmap: boolean }[]): Promise<number> {
    const disk = this.#host.disk;
    for (const r of ranges) {
      if (r.count === 0) continue;
      if (discard) await disk.discard(r.sector, r.count);
      else await disk.writeZeroes(r.sector, r.count, r.unmap);
    }
    return 0;
  }

  #finishNoStatus(): void {
    this.#busy = false;
    this.#phase = Phase.Idle;
    this.#writing = false;
    this.#host.finish(this.#head, 0);
  }

  /** Writes the status byte and returns the chain to the driver. */
  complete(status: number): void {
    const sb = this.#statusBuf;
    if (sb === undefined) return this.#finishNoStatus();
    sb[this.#statusOff] = status;
    this.#busy = false;
    this.#phase = Phase.Idle;
    this.#writing = false;
    this.#dCount = 0;
    this.#statusBuf = undefined;
    this.#host.finish(this.#head, this.#usedLen);
  }
}
