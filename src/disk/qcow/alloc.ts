/**
 * qcow2 write path: cluster and L2 allocation, copy-on-write, zero clusters, discard, and the
 * flush that orders metadata for crash consistency. `Qcow2Writer` wraps the read path's `Qcow2State` (the
 * parsed header, L1 words, L2 cache, backing image) and adds a `RefcountManager`.
 *
 * Ordering (reference/qcow2.md section 5.2, as QEMU's qcow2-cluster.c / qcow2-refcount.c):
 * (L2 tables are written back by the L2 cache, which keeps a table dirty and pinned until its
 * write has landed and serialises writes of one table; the writer pins the table it changes.)
 * - Allocation: refcount +1 in the refcount cache; data (with COW head/tail) written; then the L2
 *   entry is set in the L2 cache. Every L2 table write (flush or eviction) is preceded by writing
 *   the dirty refcount blocks and an fdatasync, so refcounts and data are durable before the L2
 *   entry that points at them.
 * - New or copied L2 table: refcounts written, table written, fdatasync, then the L1 entry.
 * - Freeing: the entry is dropped in the L2 cache and the cluster queued; its refcount is only
 *   decremented after a flush has made the L2 update durable (and after in-flight writes that may
 *   still target it have finished), so a freed cluster is never reused while an on-disk entry
 *   could still point at it.
 * - Guest flush: refcount blocks, fdatasync, L2 tables, fdatasync, then the queued frees.
 *
 * Offsets read from the image are never trusted for a write (as QEMU's overlap checks): a data
 * offset written, copied from or freed, an L2 table changed in place, a refcount block loaded to
 * be changed, and the cluster the allocator returns are checked against the live metadata (the
 * header, the L1 table, the active L2 tables, the refcount table and blocks, the snapshot table
 * and the snapshots' L1 tables, the encryption header). A problem marks the image corrupt and
 * nothing more is written.
 *
 * Concurrency: writes to clusters that are allocated with COPIED go straight to the file (a
 * synchronous cache lookup, no lock). Everything that changes metadata runs under one async mutex
 * per image (correctness first: allocations are serialised).
 */
import { DiskError, hex } from '../../errors';
import type { DiskImage } from '../disk-image';
import type { BlockStatus, ImageDescription } from '../types';
import type { ByteReader } from './chain';
import { closeLayered, readBytesAt } from './chain';
import { inflateCluster } from './compress';
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY, COMPAT_LAZY_REFCOUNTS } from './header';
import { L2Table } from './l2-cache';
import { Kind, type Qcow2State } from './qcow2';
import { RefcountManager, type RefcountStructure } from './refcount';
import {
  QCOW2_COMPRESSED,
  QCOW2_COPIED,
  QCOW2_HI_COMPRESSED,
  QCOW2_HI_COPIED,
  QCOW2_LO_ZERO,
  QCOW2_OFFSET_MASK,
  QCOW2_ZERO,
  entryWords,
  wordsEntry,
  qcow2Compressed,
  qcow2EntryOffset,
  qcow2Offset,
} from './entry';

/** A minimal async mutex (FIFO). */
export class Mutex {
  #tail: Promise<void> = Promise.resolve();

  /** Runs `fn` when every earlier `run` has finished. */
  run<T>(fn: () => Promise<T>): Promise<T> {
    const prev = this.#tail;
    let release!: () => void;
    this.#tail = new Promise<void>((r) => (release = r));
    return prev.then(fn).finally(release);
  }
}

/** A byte range of the image file that holds metadata, with its name for messages ("the snapshot table"). */
export interface MetadataExtent {
  readonly offset: number;
  readonly bytes: number;
  readonly name: string;
}

/**
 * What is about to be written where an overlap is checked: data (or a new table: may overlap no
 * metadata at all), or a structure that may overlap itself: the active L1 table, an active L2
 * table, a refcount block or the refcount table.
 */
type Written = 'data' | 'l1' | 'l2' | RefcountStructure;

/** True when `[start, end)` and `[at, at + bytes)` share a byte. */
export function intersects(start: number, end: number, at: number, bytes: number): boolean {
  return start < at + bytes && at < end;
}

interface Freed {
  readonly offset: number;
  readonly bytes: number;
}

/** The read-write state of an open qcow2 image (`DiskImage.priv` of the read-write table). */
export class Qcow2Writer implements ByteReader {
  readonly s: Qcow2State;
  readonly rc: RefcountManager;
  readonly lock = new Mutex();
  readonly #pendingFree: Freed[] = [];
  readonly #inflight = new Set<Promise<unknown>>();
  /**
   * Host offsets of the L2 tables the active L1 references, with how many L1 entries reference
   * each (overlap checks). It follows the L1 both ways: a table the L1 stops referencing (copied
   * away from a snapshot or from a missing COPIED flag) leaves it, since its cluster may be freed
   * and handed out again as data. (The other metadata is checked from live state: the header
   * copy for the L1 table, the refcount manager for the refcount table, which moves when it
   * grows, and for the blocks, which never move.)
   */
  readonly #l2Refs = new Map<number, number>();
  #prepared = false;
  /** We set the dirty bit (lazy refcounts) and must clear it at a clean close. */
  #setDirty = false;
  /** A fatal inconsistency was found: refuse further writes. */
  #broken: DiskError | undefined;
  readonly v3: boolean;

  /**
   * Metadata the writer never moves, by byte range: the snapshot table, each snapshot's L1 table
   * and the encryption header. (The header, the active L1, the active L2 tables and the refcount
   * structures are checked from live state.)
   */
  readonly #fixedMetadata: readonly MetadataExtent[];

  constructor(s: Qcow2State, rc: RefcountManager, fixedMetadata: readonly MetadataExtent[] = []) {
    this.s = s;
    this.rc = rc;
    this.#fixedMetadata = fixedMetadata;
    this.v3 = s.header.version === 3;
    rc.onTableMoved = (off, n) => {
      s.header.refcountTableOffset = off;
      s.header.refcountTableClusters = n;
    };
    rc.guard = async (offset, bytes, what, own) => {
      const meta = this.#overlap(offset, bytes, own);
      if (meta !== undefined) await this.#corrupt(`${what}, which overlaps ${meta}`);
    };
    // An entry the read path would refuse references no table we will ever read or write (any
    // access through it is refused): the image still opens, as in QEMU.
    for (let i = 0; i < s.l1Size; i++) {
      const off = s.rawL2Offset(i);
      if (off !== 0 && s.l2OffsetProblem(i, off) === undefined) this.#l2Referenced(off, +1);
    }
    s.l2Cache.setWriteBack((t, bytes) => this.#writeBackOne(t, bytes));
  }

  get backing(): DiskImage | undefined {
    return this.s.backing;
  }

  get clusterSize(): number {
    return this.s.clusterSize;
  }

  readAt(offset: number, buf: Uint8Array): Promise<void> {
    return this.s.readAt(offset, buf);
  }

  blockStatus(offset: number, length: number): Promise<BlockStatus> {
    return this.s.blockStatus(offset, length);
  }

  describe(): ImageDescription {
    return this.s.describe();
  }

  // ---------------------------------------------------------------- helpers

  #fileWrite(buf: Uint8Array, pos: number): Promise<void> {
    if (pos + buf.length > this.s.fileSize) this.s.fileSize = pos + buf.length;
    return this.s.file.write(buf, pos);
  }

  #markDirty(t: L2Table): void {
    this.s.l2Cache.markDirty(t);
  }

  #l2Referenced(offset: number, delta: 1 | -1): void {
    const n = (this.#l2Refs.get(offset) ?? 0) + delta;
    if (n > 0) this.#l2Refs.set(offset, n);
    else this.#l2Refs.delete(offset);
  }

  /**
   * The metadata that the host clusters of `[offset, offset + bytes)` overlap, named for a
   * message ("the L1 table at 0x30000"), or undefined. What is checked follows QEMU's default
   * overlap checks (qcow2_check_metadata_overlap, QCOW2_OL_CACHED): the header, the active L1 and
   * L2 tables, the refcount table and blocks, the snapshot table, the snapshots' L1 tables and the
   * encryption header; `written` leaves out the kind of structure being written, which may
   * overlap itself.
   */
  #overlap(offset: number, bytes: number, written: Written = 'data'): string | undefined {
    const s = this.s;
    const cs = s.clusterSize;
    const start = Math.floor(offset / cs) * cs;
    const end = Math.ceil((offset + bytes) / cs) * cs;
    if (start < cs) return 'the header';
    const l1 = s.header.l1TableOffset;
    if (written !== 'l1' && intersects(start, end, l1, Math.max(8, s.l1Size * 8))) return `the L1 table at ${hex(l1)}`;
    const rt = this.rc.tableOffset;
    if (written !== 'refcount-table' && intersects(start, end, rt, this.rc.tableClusters * cs)) return `the refcount table at ${hex(rt)}`;
    for (let c = start; c < end; c += cs) {
      const block = written === 'refcount-block' ? undefined : this.rc.blockIndexAt(c);
      if (block !== undefined) return `refcount block ${block} at ${hex(c)}`;
      if (written !== 'l2' && this.#l2Refs.has(c)) return `the L2 table at ${hex(c)}`;
    }
    for (const m of this.#fixedMetadata) if (intersects(start, end, m.offset, m.bytes)) return `${m.name} at ${hex(m.offset)}`;
    return undefined;
  }

  /** Why data may not be written at `host` (from an L2 entry), or undefined: the read path's checks, and no metadata there. */
  #dataProblem(host: number): string | undefined {
    const problem = this.s.dataClusterProblem(host);
    if (problem !== undefined) return problem;
    const meta = this.#overlap(host, this.s.clusterSize);
    return meta !== undefined ? `has data offset ${hex(host)}, which overlaps ${meta}` : undefined;
  }

  /** A cluster the allocator just returned for `what` (data, an L2 table) is free of metadata; else the image is corrupt. */
  async #checkAllocated(host: number, what: string): Promise<void> {
    const meta = this.#overlap(host, this.s.clusterSize);
    if (meta !== undefined) await this.#corrupt(`the allocator returned cluster ${hex(host)} for ${what}, which overlaps ${meta} (its refcount is wrong)`);
  }

  /** Marks the image corrupt (incompatible bit 1) and refuses further writes, as QEMU does. */
  async #corrupt(msg: string): Promise<never> {
    const err = new DiskError('E_QCOW_CORRUPT', `Cannot write ${this.s.path}: ${msg}; the image is now marked corrupt`);
    this.#broken = err;
    if (this.v3) {
      this.s.header.incompatibleFeatures |= INCOMPAT_CORRUPT;
      await this.#writeFeatures().catch(() => undefined);
    }
    throw err;
  }

  /**
   * After corruption was found nothing more is written, not even a flush of what is cached (as
   * QEMU, which detaches the driver): the metadata in memory can no longer be trusted.
   */
  #checkUsable(): void {
    if (this.#broken) throw this.#broken;
  }

  /** Writes the three v3 feature bitmaps (bytes 72..95 of the header) and syncs. */
  async #writeFeatures(): Promise<void> {
    const h = this.s.header;
    const b = Buffer.alloc(24);
    b.writeBigUInt64BE(BigInt.asUintN(64, h.incompatibleFeatures), 0);
    b.writeBigUInt64BE(BigInt.asUintN(64, h.compatibleFeatures), 8);
    b.writeBigUInt64BE(BigInt.asUintN(64, h.autoclearFeatures), 16);
    await this.s.file.write(b, 72);
    await this.s.file.sync();
  }

  /**
   * Before the first change: clear autoclear bits (vblk maintains no bitmaps) and, with lazy
   * refcounts, set the dirty bit (synced before anything else is written).
   */
  async #prepare(): Promise<void> {
    if (this.#prepared) return;
    const h = this.s.header;
    if (this.v3) {
      let change = false;
      if (h.autoclearFeatures !== 0n) {
        h.autoclearFeatures = 0n;
        change = true;
      }
      if ((h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n && (h.incompatibleFeatures & INCOMPAT_DIRTY) === 0n) {
        h.incompatibleFeatures |= INCOMPAT_DIRTY;
        this.#setDirty = true;
        change = true;
      }
      if (change) await this.#writeFeatures();
    }
    this.#prepared = true;
  }

  /** Keeps a fast-path write registered until it settles (flush waits before reusing clusters). */
  #track<T>(p: Promise<T>): Promise<T> {
    this.#inflight.add(p);
    const done = (): void => {
      this.#inflight.delete(p);
    };
    p.then(done, done);
    return p;
  }

  /** The high word of L1 entry `i` (its flags). */
  #l1Hi(i: number): number {
    return this.s.l1[2 * i] ?? 0;
  }

  /** L1 entry `i` as one 64-bit value (messages). */
  #l1Entry(i: number): bigint {
    return wordsEntry(this.#l1Hi(i), this.s.l1[2 * i + 1] ?? 0);
  }

  /** The cached table at `l2off`, pinned (the caller unpins it when done with it). */
  async #table(l2off: number): Promise<L2Table> {
    for (;;) {
      const t = this.s.l2Cache.peek(l2off) ?? (await this.s.l2Cache.get(l2off));
      // It may have been evicted again between the load and this continuation: use the live one.
      if (this.s.l2Cache.peek(l2off) === t) {
        this.s.l2Cache.pin(t);
        return t;
      }
    }
  }

  async #writeL1Entry(i: number, value: bigint): Promise<void> {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(value);
    await this.#fileWrite(b, this.s.header.l1TableOffset + i * 8);
    [this.s.l1[2 * i], this.s.l1[2 * i + 1]] = entryWords(value);
  }

  /**
   * The L2 table for L1 index `l1i`, ready to be modified: allocated when missing, copied when
   * shared with a snapshot (L1 entry without COPIED). Call under the lock. The table is returned
   * pinned in the cache: the caller must `unpin` it.
   */
  async #writableTable(l1i: number): Promise<L2Table> {
    const s = this.s;
    const l2off = await this.#l2OffsetForWrite(l1i);
    if (l2off !== 0 && this.#l1Hi(l1i) & QCOW2_HI_COPIED) {
      // Changed in place and written back there: the offset must not be other metadata.
      const meta = this.#overlap(l2off, s.clusterSize, 'l2');
      if (meta !== undefined) await this.#corrupt(`L1 entry ${l1i} (${hex(this.#l1Entry(l1i))}) has L2 table offset ${hex(l2off)}, which overlaps ${meta}`);
      return this.#table(l2off);
    }
    // The L1 entry will be rewritten: l1_table_offset must not point into other metadata.
    const l1meta = this.#overlap(s.header.l1TableOffset + l1i * 8, 8, 'l1');
    if (l1meta !== undefined) await this.#corrupt(`the L1 table at ${hex(s.header.l1TableOffset)} overlaps ${l1meta}`);
    const old = l2off !== 0 ? await this.#table(l2off) : undefined;
    let words: Uint32Array;
    let stride = 2;
    if (old) {
      words = old.words.slice();
      stride = old.stride;
      s.l2Cache.unpin(old);
    } else {
      words = new Uint32Array((s.clusterSize / 4) | 0);
    }
    const newOff = await this.rc.allocate(1);
    await this.#checkAllocated(newOff, 'an L2 table');
    const t = new L2Table(newOff, words, stride);
    try {
      await this.rc.flush();
      await this.#fileWrite(t.encode(), newOff);
      await s.file.sync();
    } catch (e) {
      await this.rc.adjust(newOff / s.clusterSize, -1).catch(() => undefined); // nothing references it
      throw e;
    }
    // From here a failure may leave the L1 entry on disk: never release the new table then.
    await this.#writeL1Entry(l1i, BigInt(newOff) | QCOW2_COPIED);
    this.#l2Referenced(newOff, +1);
    if (old) this.#l2Referenced(old.offset, -1);
    s.l2Cache.pin(t);
    await s.l2Cache.insert(t);
    if (old) {
      // The old table leaves the cache with the L1 reference (unless another L1 entry still
      // uses it, in a corrupt image): its cluster may be handed out again once freed, and a
      // stale copy kept under that offset must never be written back over the new contents.
      if (!this.#l2Refs.has(old.offset) && !old.dirty && old.pins === 0) s.l2Cache.forget(old.offset);
      this.#pendingFree.push({ offset: old.offset, bytes: s.clusterSize });
    }
    return t;
  }

  /** The L2 table offset of L1 entry `l1i` (0 = none), checked as the read path checks it; else the image is corrupt. */
  async #l2OffsetForWrite(l1i: number): Promise<number> {
    const problem = this.s.l2OffsetProblem(l1i);
    if (problem !== undefined) await this.#corrupt(problem);
    return this.s.rawL2Offset(l1i);
  }

  /** Contents a partial write into an unallocated/zero/compressed/shared cluster starts from. */
  async #cowSource(kind: 'zero' | 'backing' | 'data' | 'compressed', clusterStart: number, host: number, entry: bigint): Promise<Uint8Array> {
    const s = this.s;
    const cs = s.clusterSize;
    if (kind === 'zero') return new Uint8Array(cs);
    if (kind === 'backing') {
      const b = new Uint8Array(cs);
      if (s.backing) await readBytesAt(s.backing, clusterStart, b);
      return b;
    }
    if (kind === 'data') {
      const b = new Uint8Array(cs);
      const n = await s.file.read(b, host);
      if (n < cs) b.fill(0, n);
      return b;
    }
    const ext = s.compressedExtent(entry); // starts inside the file (checked by #referenced)
    const raw = Buffer.alloc(Math.min(ext.length, s.fileSize - ext.host));
    const n = await s.file.read(raw, ext.host);
    return inflateCluster(raw.subarray(0, n), cs, ext.host);
  }

  /**
   * The host byte range entry `l2i` of `t` holds a reference to, about to be freed (the entry is
   * being replaced), or undefined. Its offset is checked first as for a write: a refcount will be
   * decremented there, and freeing the L1 table's cluster, say, would hand it out as data.
   */
  async #referenced(t: L2Table, l2i: number): Promise<Freed | undefined> {
    const s = this.s;
    const entry = t.entry(l2i);
    if (entry & QCOW2_COMPRESSED) {
      const { host, sectors } = qcow2Compressed(entry, s.clusterBits);
      const problem = s.compressedProblem(host);
      if (problem !== undefined) {
        throw new DiskError('E_QCOW_CORRUPT', `Cannot write ${s.path}: L2 entry ${l2i} of table ${hex(t.offset)} (${hex(entry)}): ${problem}`, { l2Index: l2i, table: t.offset });
      }
      return { offset: host - (host % 512), bytes: sectors * 512 };
    }
    const off = qcow2EntryOffset(entry);
    if (off === 0) return undefined;
    await this.#checkDataEntry(t, l2i, off);
    return { offset: off, bytes: s.clusterSize };
  }

  /** The data offset `host` of entry `l2i` of `t` may be written, copied from or freed; else the image is corrupt. */
  async #checkDataEntry(t: L2Table, l2i: number, host: number): Promise<void> {
    const problem = this.#dataProblem(host);
    if (problem !== undefined) await this.#corrupt(`L2 entry ${l2i} of table ${hex(t.offset)} (${hex(t.entry(l2i))}) ${problem}`);
  }

  // ---------------------------------------------------------------- writes

  /**
   * Writes `data` at guest offset `off`; the range must lie inside one cluster.
   */
  writeInCluster(off: number, data: Uint8Array): Promise<void> {
    this.#checkUsable();
    const fast = this.#tryInPlace(off, data);
    if (fast) return fast;
    return this.lock.run(() => this.#writeLocked(off, data));
  }

  /** Synchronous check for an in-place write (allocated, COPIED, not zero); else undefined. */
  #tryInPlace(off: number, data: Uint8Array): Promise<void> | undefined {
    if (!this.#prepared) return undefined;
    const ci = Math.floor(off / this.s.clusterSize);
    const host = this.#inPlaceHost(ci);
    if (host < 0) return undefined;
    return this.#track(this.#fileWrite(data, host + (off - ci * this.s.clusterSize)));
  }

  /**
   * Host offset of guest cluster `ci` when a write may go there in place (allocated, COPIED, not
   * zero, not compressed, a sane data cluster, its L2 table cached); else -1 (the slow path
   * decides, and reports corruption).
   */
  #inPlaceHost(ci: number): number {
    const s = this.s;
    const l1i = Math.floor(ci / s.l2Entries);
    const l2off = s.rawL2Offset(l1i);
    if (l2off === 0 || s.l2OffsetProblem(l1i, l2off) !== undefined) return -1;
    const t = s.l2Cache.peek(l2off);
    if (!t) return -1;
    const i = (ci - l1i * s.l2Entries) * t.stride;
    const hi = t.words[i] ?? 0;
    const lo = t.words[i + 1] ?? 0;
    // (`&` yields a signed 32-bit value: compare with `>>> 0`.)
    if (((hi & (QCOW2_HI_COPIED | QCOW2_HI_COMPRESSED)) >>> 0) !== QCOW2_HI_COPIED || lo & QCOW2_LO_ZERO) return -1;
    const host = qcow2Offset(hi, lo);
    if (host === 0 || this.#dataProblem(host) !== undefined) return -1;
    return host;
  }

  /**
   * A write spanning several clusters, as one file write when every cluster can be written in
   * place and their host clusters are consecutive (a preallocated or converted image: a 1 MiB
   * guest write is then one pwrite, not 16); else undefined and the caller splits it.
   */
  tryInPlaceRange(off: number, data: Uint8Array): Promise<void> | undefined {
    this.#checkUsable();
    if (!this.#prepared || data.length === 0) return undefined;
    const cs = this.s.clusterSize;
    const first = Math.floor(off / cs);
    const last = Math.floor((off + data.length - 1) / cs);
    const base = this.#inPlaceHost(first);
    if (base < 0) return undefined;
    for (let ci = first + 1; ci <= last; ci++) {
      if (this.#inPlaceHost(ci) !== base + (ci - first) * cs) return undefined;
    }
    return this.#track(this.#fileWrite(data, base + (off - first * cs)));
  }

  async #writeLocked(off: number, data: Uint8Array): Promise<void> {
    this.#checkUsable();
    await this.#prepare();
    const s = this.s;
    const cs = s.clusterSize;
    const ci = Math.floor(off / cs);
    const l1i = Math.floor(ci / s.l2Entries);
    const l2i = ci - l1i * s.l2Entries;
    const t = await this.#writableTable(l1i);
    try {
      await this.#writeInTable(t, l2i, off, data);
    } finally {
      s.l2Cache.unpin(t);
    }
  }

  /** `#writeLocked` once the L2 table `t` (pinned) is writable; `l2i` is the entry of `off`. */
  async #writeInTable(t: L2Table, l2i: number, off: number, data: Uint8Array): Promise<void> {
    const s = this.s;
    const cs = s.clusterSize;
    const ci = Math.floor(off / cs);
    const clusterStart = ci * cs;
    const inCluster = off - clusterStart;
    const entry = t.entry(l2i);
    const [hi, lo] = entryWords(entry);
    const host = qcow2Offset(hi, lo);
    const compressed = (hi & QCOW2_HI_COMPRESSED) !== 0;
    const zero = !compressed && (lo & QCOW2_LO_ZERO) !== 0;
    // Validated as the read path does, plus the overlap check: never write into, or copy
    // from, a cluster the entry has no business pointing at.
    if (!compressed && host !== 0) await this.#checkDataEntry(t, l2i, host);
    const full = inCluster === 0 && data.length === cs;
    const copied = (hi & QCOW2_HI_COPIED) !== 0;
    if (!compressed && host !== 0 && copied && !zero) {
      // Allocated in place (raced with the fast path's conditions): just write.
      await this.#track(this.#fileWrite(data, host + inCluster));
      return;
    }
    if (!compressed && host !== 0 && copied && zero) {
      // ZERO_ALLOC owned by us: rewrite the whole cluster in place, then clear the zero flag.
      const buf = full ? data : new Uint8Array(cs);
      if (!full) buf.set(data, inCluster);
      await this.#track(this.#fileWrite(buf, host));
      t.setEntry(l2i, BigInt(host) | QCOW2_COPIED);
      this.#markDirty(t);
      return;
    }
    // A new cluster. Where the rest of it comes from:
    let source: 'zero' | 'backing' | 'data' | 'compressed' = 'zero';
    if (compressed) source = 'compressed';
    else if (zero) source = 'zero';
    else if (host !== 0) source = 'data';
    else if (s.backing && clusterStart < s.backing.size) source = 'backing';
    const old = compressed || host !== 0 ? await this.#referenced(t, l2i) : undefined;
    const newHost = await this.rc.allocate(1);
    try {
      await this.#checkAllocated(newHost, 'data');
      const fresh = newHost >= s.fileSize; // past EOF: reads as zeroes already
      if (full) {
        await this.#fileWrite(data, newHost);
      } else if (source === 'zero' && fresh) {
        await this.#fileWrite(data, newHost + inCluster);
      } else {
        const buf = await this.#cowSource(source, clusterStart, host, entry);
        buf.set(data, inCluster);
        await this.#fileWrite(buf, newHost);
      }
    } catch (e) {
      if (!this.#broken) await this.rc.adjust(newHost / cs, -1).catch(() => undefined); // unreferenced
      throw e;
    }
    t.setEntry(l2i, BigInt(newHost) | QCOW2_COPIED);
    this.#markDirty(t);
    if (old) this.#pendingFree.push(old);
  }

  /**
   * Makes `[off, off+len)` read as zeroes (`mode: 'zero'`) or deallocates it (`'discard'`).
   * Whole clusters change their L2 entry; partial clusters are written with zeroes (zero mode) or
   * left alone (discard: advisory, as QEMU).
   */
  async zeroRange(off: number, len: number, mode: 'zero' | 'discard', unmap: boolean): Promise<void> {
    this.#checkUsable();
    const cs = this.s.clusterSize;
    let cur = off;
    const end = off + len;
    while (cur < end) {
      const ce = Math.min(end, (Math.floor(cur / cs) + 1) * cs);
      const n = ce - cur;
      if (n === cs) await this.lock.run(() => this.#zeroCluster(cur, mode, unmap));
      else if (mode === 'zero') await this.lock.run(() => this.#zeroPartial(cur, n));
      cur = ce;
    }
    if (this.#pendingFree.length > 4096) await this.flush();
  }

  async #zeroPartial(off: number, n: number): Promise<void> {
    const s = this.s;
    const m = await s.lookup(off);
    // Already zero: unallocated without a backing file, or a zero cluster.
    if (m.kind === Kind.Zero || (m.kind === Kind.Unallocated && !(s.backing && off < s.backing.size))) return;
    await this.#writeLocked(off, new Uint8Array(n));
  }

  async #zeroCluster(off: number, mode: 'zero' | 'discard', unmap: boolean): Promise<void> {
    this.#checkUsable();
    const s = this.s;
    const cs = s.clusterSize;
    const ci = off / cs;
    const l1i = Math.floor(ci / s.l2Entries);
    const l2i = ci - l1i * s.l2Entries;
    const hasBacking = s.backing !== undefined && off < s.backing.size;
    if ((await this.#l2OffsetForWrite(l1i)) === 0 && !hasBacking) return; // reads as zero already
    if (!this.v3) {
      if (hasBacking) {
        // v2 has no zero flag: discard is a no-op, zeroing writes zeroes.
        if (mode === 'zero') await this.#writeLocked(off, new Uint8Array(cs));
        return;
      }
    }
    await this.#prepare();
    const t = await this.#writableTable(l1i);
    try {
      await this.#zeroEntry(t, l2i, mode, unmap, hasBacking);
    } finally {
      s.l2Cache.unpin(t);
    }
  }

  /** Sets entry `l2i` of the writable table `t` to read as zeroes or unallocated. */
  async #zeroEntry(t: L2Table, l2i: number, mode: 'zero' | 'discard', unmap: boolean, hasBacking: boolean): Promise<void> {
    const entry = t.entry(l2i);
    const [hi, lo] = entryWords(entry);
    const compressed = (hi & QCOW2_HI_COMPRESSED) !== 0;
    const host = compressed ? 0 : qcow2Offset(hi, lo);
    const zero = !compressed && (lo & QCOW2_LO_ZERO) !== 0;
    // Kept (ZERO_ALLOC) or freed below: either way the offset must be one a write may trust.
    if (host !== 0) await this.#checkDataEntry(t, l2i, host);
    let next: bigint;
    if (!this.v3) next = 0n;
    else if (mode === 'zero' && !unmap && !compressed && host !== 0 && hi & QCOW2_HI_COPIED) {
      if (zero) return;
      next = BigInt(host) | QCOW2_COPIED | QCOW2_ZERO; // ZERO_ALLOC: keep the cluster
    } else if (mode === 'zero' || hasBacking) next = QCOW2_ZERO; // ZERO_PLAIN
    else next = 0n;
    if (next === entry) return;
    const old = next & QCOW2_OFFSET_MASK ? undefined : await this.#referenced(t, l2i);
    t.setEntry(l2i, next);
    this.#markDirty(t);
    if (old) this.#pendingFree.push(old);
  }

  // ---------------------------------------------------------------- flush

  /** Eviction write-back of one table snapshot: refcounts first, sync, then the table. */
  async #writeBackOne(t: L2Table, bytes: Buffer): Promise<void> {
    this.#checkUsable();
    await this.rc.flush();
    await this.s.file.sync();
    await this.#fileWrite(bytes, t.offset);
  }

  /** Makes every completed write durable, then releases the clusters freed before it. */
  flush(): Promise<void> {
    return this.lock.run(() => this.#flushLocked());
  }

  async #flushLocked(): Promise<void> {
    this.#checkUsable();
    const s = this.s;
    const inflight = [...this.#inflight];
    const frees = this.#pendingFree.splice(0);
    try {
      await this.rc.flush();
      await s.file.sync();
      // Refcounts and data are durable: the tables can be written without a barrier each.
      await s.l2Cache.flush((t, bytes) => this.#fileWrite(bytes, t.offset));
      await s.file.sync();
    } catch (e) {
      this.#pendingFree.unshift(...frees);
      throw e;
    }
    if (frees.length > 0) {
      await Promise.allSettled(inflight);
      for (const f of frees) await this.rc.release(f.offset, f.bytes);
      s.dropInflated();
    }
  }

  /**
   * Flush, clear the dirty bit we set, release the file. Once the image was found corrupt only
   * the file is released: nothing more is written (the write that found it reported it).
   */
  async close(): Promise<void> {
    try {
      if (this.#broken) return;
      await this.flush(); // releases queued frees into the refcount cache; written below
      await this.lock.run(async () => {
        await this.rc.flush();
        await this.s.file.sync();
        if (this.#setDirty && !this.#broken) {
          this.s.header.incompatibleFeatures &= ~INCOMPAT_DIRTY;
          await this.#writeFeatures();
        }
      });
    } finally {
      // Released whether or not the flush failed; its error (if any) is what close reports.
      await closeLayered(this.s);
    }
  }
}
