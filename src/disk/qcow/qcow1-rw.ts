/**
 * qcow version 1, read-write (block/qcow.c's model: no refcounts, new clusters and L2 tables are
 * appended at the end of the file and never reused).
 *
 * Crash safety without refcounts means ordering only:
 * - data (a whole new cluster, or the merged copy of a compressed / backing cluster) is written
 *   before the L2 entry that points at it; L2 entries are kept in the cache and written at flush
 *   (or eviction) after an fdatasync, so an entry never reaches the disk before its data;
 * - a new L2 table is written and synced before the L1 entry that points at it.
 * A crash can therefore leave unreferenced space at the end of the file, never an entry that
 * points at garbage. Discards and zero writes without a backing file clear entries (the space is
 * not reused: qcow1 cannot know it is free).
 *
 * Offsets read from the image are checked before anything is written through them: a data
 * offset as the read path checks it (cluster-aligned, inside the file) and against the header,
 * the backing file name, the L1 table and the L2 tables; an L2 table changed in place against
 * the same metadata. A problem is E_QCOW_CORRUPT naming the entry (qcow1 has no corrupt bit).
 */
import { DiskError, hex } from '../../errors';
import { DiskImage } from '../disk-image';
import type { ImageFile } from '../file';
import type { DiskImageOps } from '../types';
import { SECTOR_SIZE } from '../types';
import { closeLayered, readBytesAt, writeByCluster } from './chain';
import { inflateCluster } from './compress';
import { L2Table } from './l2-cache';
import { Mutex, intersects } from './alloc';
import { openQcowState, type QcowOpenOptions, type QcowState } from './qcow1';
import { QCOW1_HEADER_SIZE } from './header';
import { QCOW_HI_COMPRESSED, offsetWords, qcowCompressed, qcowOffset, wordsEntry } from './entry';

/** Read-write state of a qcow1 image (`DiskImage.priv`). */
export class QcowWriter {
  readonly s: QcowState;
  readonly lock = new Mutex();
  /** Next allocation offset (cluster-aligned end of the file). */
  #end: number;

  /**
   * Host cluster index → offsets of the L2 tables with bytes in that cluster, for every table the
   * L1 references (qcow never frees or moves one). Nothing in the format makes a table cluster-
   * aligned, so one may straddle two clusters and share them with another.
   */
  readonly #l2Clusters = new Map<number, number[]>();
  /**
   * Bytes of the backing file name at backing_file_offset (0: none). Its UTF-8 length is at
   * least its length on disk, so the range errs on the large side. Fixed for the image's life:
   * computed once, not on every in-place write.
   */
  readonly #backingNameBytes: number;

  constructor(s: QcowState) {
    this.s = s;
    this.#backingNameBytes = s.header.backingFile !== undefined ? Buffer.byteLength(s.header.backingFile) : 0;
    this.#end = Math.ceil(s.fileSize / s.clusterSize) * s.clusterSize;
    // An entry the read path would refuse references no table we will ever read or write.
    for (let i = 0; i < s.l1Size; i++) {
      const off = s.rawL2Offset(i);
      if (off !== 0 && s.l2OffsetProblem(i, off) === undefined) this.#addL2Table(off);
    }
    s.l2Cache.setWriteBack((t, bytes) => this.#writeBackOne(t, bytes));
  }

  get backing(): DiskImage | undefined {
    return this.s.backing;
  }

  readAt(offset: number, buf: Uint8Array): Promise<void> {
    return this.s.readAt(offset, buf);
  }

  #write(buf: Uint8Array, pos: number): Promise<void> {
    if (pos + buf.length > this.s.fileSize) this.s.fileSize = pos + buf.length;
    return this.s.file.write(buf, pos);
  }

  #alloc(bytes: number): number {
    const off = this.#end;
    this.#end = Math.ceil((off + bytes) / this.s.clusterSize) * this.s.clusterSize;
    return off;
  }

  /**
   * The metadata that the bytes `[start, start + bytes)` overlap, named for a message, or
   * undefined: the header, the backing file name (wherever backing_file_offset puts it), the L1
   * table, or an L2 table other than the one at `self` (a table may of course overlap itself).
   */
  #metadataOverlap(start: number, bytes: number, self?: number): string | undefined {
    const s = this.s;
    const h = s.header;
    const end = start + bytes;
    if (intersects(start, end, 0, QCOW1_HEADER_SIZE)) return 'the header';
    if (intersects(start, end, h.backingFileOffset, this.#backingNameBytes)) return `the backing file name at ${hex(h.backingFileOffset)}`;
    if (intersects(start, end, h.l1TableOffset, s.l1Size * 8)) return `the L1 table at ${hex(h.l1TableOffset)}`;
    const cs = s.clusterSize;
    const tableBytes = s.l2Entries * 8;
    for (let c = Math.floor(start / cs); c * cs < end; c++) {
      for (const off of this.#l2Clusters.get(c) ?? []) {
        if (off !== self && intersects(start, end, off, tableBytes)) return `the L2 table at ${hex(off)}`;
      }
    }
    return undefined;
  }

  /** E_QCOW_CORRUPT for a write refused because of what the image says (message: one line). */
  #corrupt(msg: string, data: Record<string, unknown>): DiskError {
    return new DiskError('E_QCOW_CORRUPT', `Cannot write ${this.s.path}: ${msg}`, data);
  }

  #addL2Table(offset: number): void {
    const cs = this.s.clusterSize;
    const last = Math.floor((offset + this.s.l2Entries * 8 - 1) / cs);
    for (let c = Math.floor(offset / cs); c <= last; c++) {
      const tables = this.#l2Clusters.get(c);
      if (!tables) this.#l2Clusters.set(c, [offset]);
      else if (!tables.includes(offset)) tables.push(offset);
    }
  }

  /** Why data may not be written at `host` (from an L2 entry), or undefined: the read path's checks, and no metadata there. */
  #dataProblem(host: number): string | undefined {
    const s = this.s;
    const problem = s.dataClusterProblem(host);
    if (problem !== undefined) return problem;
    const meta = this.#metadataOverlap(host, s.clusterSize);
    return meta !== undefined ? `has data offset ${hex(host)}, which overlaps ${meta}` : undefined;
  }

  /** A data cluster offset from an L2 entry is usable for a write; else E_QCOW_CORRUPT naming the entry. */
  #checkDataCluster(t: L2Table, l2i: number, host: number): void {
    const problem = this.#dataProblem(host);
    if (problem !== undefined) throw this.#corrupt(`L2 entry ${l2i} of table ${hex(t.offset)} (${hex(t.entry(l2i))}) ${problem}`, { l2Index: l2i, table: t.offset });
  }

  /**
   * The L2 table offset of L1 entry `l1i` may be written through (the table is changed in place
   * and written back there): it must lie inside the file, as for reads, and not overlap the
   * header, the L1 table or another L2 table.
   */
  #checkL2Table(l1i: number, off: number): void {
    const problem = this.s.l2OffsetProblem(l1i);
    if (problem !== undefined) throw this.#corrupt(problem, { l1Index: l1i });
    const meta = this.#metadataOverlap(off, this.s.l2Entries * 8, off);
    if (meta === undefined) return;
    const e = wordsEntry(this.s.l1[2 * l1i] ?? 0, this.s.l1[2 * l1i + 1] ?? 0);
    throw this.#corrupt(`L1 entry ${l1i} (${hex(e)}) has L2 table offset ${hex(off)}, which overlaps ${meta}`, { l1Index: l1i });
  }

  #markDirty(t: L2Table): void {
    this.s.l2Cache.markDirty(t);
  }

  /** Eviction write-back of one table snapshot (the L2 cache keeps it pinned until written). */
  async #writeBackOne(t: L2Table, bytes: Buffer): Promise<void> {
    await this.s.file.sync(); // the data the entries point at first
    await this.#write(bytes, t.offset);
  }

  /**
   * The L2 table of L1 index `l1i`, to be changed (created when `create`), returned pinned: the
   * caller unpins.
   */
  async #table(l1i: number, create: boolean): Promise<L2Table | undefined> {
    const s = this.s;
    const off = s.rawL2Offset(l1i);
    if (off !== 0) {
      this.#checkL2Table(l1i, off);
      for (;;) {
        const t = s.l2Cache.peek(off) ?? (await s.l2Cache.get(off));
        if (s.l2Cache.peek(off) === t) {
          s.l2Cache.pin(t);
          return t;
        }
      }
    }
    if (!create) return undefined;
    const bytes = s.l2Entries * 8;
    const newOff = this.#alloc(bytes);
    const t = new L2Table(newOff, new Uint32Array(s.l2Entries * 2), 2);
    await this.#write(new Uint8Array(bytes), newOff);
    await s.file.sync();
    const e = Buffer.alloc(8);
    e.writeBigUInt64BE(BigInt(newOff));
    await this.#write(e, s.header.l1TableOffset + l1i * 8);
    [s.l1[2 * l1i], s.l1[2 * l1i + 1]] = offsetWords(newOff);
    this.#addL2Table(newOff);
    s.l2Cache.pin(t);
    await s.l2Cache.insert(t);
    return t;
  }

  /** Writes `data` at guest offset `off` (inside one cluster). */
  async writeInCluster(off: number, data: Uint8Array): Promise<void> {
    const s = this.s;
    const cs = s.clusterSize;
    const ci = Math.floor(off / cs);
    const l1i = Math.floor(ci / s.l2Entries);
    const l2i = ci - l1i * s.l2Entries;
    // Fast path: an allocated plain cluster is overwritten in place.
    // (Only data is written here, at an offset checked below; the table itself is not changed.)
    const l2off = s.rawL2Offset(l1i);
    const cached = l2off !== 0 ? s.l2Cache.peek(l2off) : undefined;
    if (cached) {
      const hi = cached.words[2 * l2i] ?? 0;
      const host = qcowOffset(hi, cached.words[2 * l2i + 1] ?? 0);
      // Only an offset that passes every check goes straight to the file; anything else takes
      // the locked path, which reports it.
      if (host !== 0 && !(hi & QCOW_HI_COMPRESSED) && this.#dataProblem(host) === undefined) {
        return this.#write(data, host + (off - ci * cs));
      }
    }
    return this.lock.run(() => this.#writeLocked(off, data));
  }

  async #writeLocked(off: number, data: Uint8Array): Promise<void> {
    const s = this.s;
    const cs = s.clusterSize;
    const ci = Math.floor(off / cs);
    const l1i = Math.floor(ci / s.l2Entries);
    const l2i = ci - l1i * s.l2Entries;
    const t = await this.#table(l1i, true);
    if (!t) throw new RangeError('no L2 table');
    try {
      await this.#writeInTable(t, l2i, off, data);
    } finally {
      s.l2Cache.unpin(t);
    }
  }

  async #writeInTable(t: L2Table, l2i: number, off: number, data: Uint8Array): Promise<void> {
    const s = this.s;
    const cs = s.clusterSize;
    const ci = Math.floor(off / cs);
    const clusterStart = ci * cs;
    const inCluster = off - clusterStart;
    const hi = t.words[2 * l2i] ?? 0;
    const lo = t.words[2 * l2i + 1] ?? 0;
    const compressed = (hi & QCOW_HI_COMPRESSED) !== 0;
    const host = compressed ? 0 : qcowOffset(hi, lo);
    if (host !== 0) {
      this.#checkDataCluster(t, l2i, host);
      await this.#write(data, host + inCluster);
      return;
    }
    const full = inCluster === 0 && data.length === cs;
    let buf: Uint8Array = data;
    if (!full) {
      const merged = new Uint8Array(cs);
      if (compressed) {
        // The rest of the cluster comes from its compressed stream, checked as the read path does.
        const { host: at, csize } = qcowCompressed(hi, lo, s.clusterBits);
        const problem = s.compressedProblem(at);
        if (problem !== undefined) throw this.#corrupt(`L2 entry ${l2i} of table ${hex(t.offset)} ${problem}`, { l2Index: l2i, table: t.offset });
        const raw = Buffer.alloc(Math.min(csize, s.fileSize - at));
        const n = await s.file.read(raw, at);
        merged.set(await inflateCluster(raw.subarray(0, n), cs, at));
      } else if (s.backing && clusterStart < s.backing.size) {
        await readBytesAt(s.backing, clusterStart, merged);
      }
      merged.set(data, inCluster);
      buf = merged;
    }
    const newHost = this.#alloc(cs);
    await this.#write(buf, newHost);
    [t.words[2 * l2i], t.words[2 * l2i + 1]] = offsetWords(newHost);
    this.#markDirty(t);
  }

  /** Whole clusters read as zero afterwards: entries cleared (no backing) or zeroes written. */
  async zeroRange(off: number, len: number, mode: 'zero' | 'discard'): Promise<void> {
    const s = this.s;
    const cs = s.clusterSize;
    let cur = off;
    while (cur < off + len) {
      const ce = Math.min(off + len, (Math.floor(cur / cs) + 1) * cs);
      const n = ce - cur;
      const hasBacking = s.backing !== undefined && cur < s.backing.size;
      const at = cur;
      if (n === cs && !hasBacking) {
        await this.lock.run(async () => {
          const ci = at / cs;
          const l1i = Math.floor(ci / s.l2Entries);
          const t = await this.#table(l1i, false);
          if (!t) return;
          s.l2Cache.unpin(t); // no await below
          const l2i = ci - l1i * s.l2Entries;
          if ((t.words[2 * l2i] ?? 0) === 0 && (t.words[2 * l2i + 1] ?? 0) === 0) return;
          t.words[2 * l2i] = 0;
          t.words[2 * l2i + 1] = 0;
          this.#markDirty(t);
        });
      } else if (mode === 'zero') {
        await this.writeInCluster(at, new Uint8Array(n));
      }
      cur = ce;
    }
  }

  flush(): Promise<void> {
    return this.lock.run(async () => {
      const s = this.s;
      await s.file.sync(); // data before the tables that point at it
      await s.l2Cache.flush((t, bytes) => this.#write(bytes, t.offset));
      await s.file.sync();
    });
  }

  async close(): Promise<void> {
    try {
      await this.flush();
    } finally {
      // Released whether or not the flush failed; its error (if any) is what close reports.
      await closeLayered(this.s);
    }
  }
}

/** The qcow version 1 read-write ops table. */
export const qcowReadWriteOps: DiskImageOps<QcowWriter> = {
  name: 'qcow-rw',
  readSector(disk, sector, buf) {
    return disk.priv.s.readAt(sector * SECTOR_SIZE, buf).then(() => buf.length);
  },
  async writeSector(disk, sector, buf) {
    const w = disk.priv;
    await writeByCluster(sector * SECTOR_SIZE, buf, w.s.clusterSize, (off, piece) => w.writeInCluster(off, piece));
    return buf.length;
  },
  flush(disk) {
    return disk.priv.flush();
  },
  close(disk) {
    return disk.priv.close();
  },
  discard(disk, sector, count) {
    return disk.priv.zeroRange(sector * SECTOR_SIZE, count * SECTOR_SIZE, 'discard');
  },
  writeZeroes(disk, sector, count) {
    return disk.priv.zeroRange(sector * SECTOR_SIZE, count * SECTOR_SIZE, 'zero');
  },
  blockStatus(disk, offset, length) {
    return disk.priv.s.blockStatus(offset, length);
  },
  describe(disk) {
    return disk.priv.s.describe();
  },
};

/** Opens a qcow version 1 image read-write over a writable file (closing it when opening fails). */
export async function openQcow1ReadWrite(file: ImageFile, opts: QcowOpenOptions): Promise<DiskImage<QcowWriter>> {
  let w: QcowWriter;
  try {
    w = new QcowWriter(await openQcowState(file, opts));
  } catch (e) {
    await file.close().catch(() => undefined);
    throw e;
  }
  return new DiskImage<QcowWriter>({ path: opts.path, format: 'qcow', size: w.s.size, readonly: false, ops: qcowReadWriteOps, priv: w });
}
