/**
 * qcow2 refcounts (docs/interop/qcow2.rst, "Host cluster management"): the codec for refcount
 * blocks of every width (refcount_order 0..6, sub-byte widths packed LSB-first), and the
 * `RefcountManager` that owns the refcount table, a write-back cache of refcount blocks, and
 * cluster allocation.
 *
 * Crash-safety rules the manager keeps by itself:
 * - a new refcount block describes itself, is written and synced before the table entry that
 *   hooks it in is written (and synced);
 * - a grown refcount table (with the blocks that describe it) is written and synced before the
 *   header switches to it; the old table is freed only after the switch is durable.
 * Rules the caller keeps: `flush()` (then a sync) before any L1/L2 entry that references a newly
 * allocated cluster is written; `release()` only after the L2/L1 update that dropped the last
 * reference is durable. The manager is not re-entrant: call it under the image's metadata lock.
 */
import { DiskError, hex } from '../../errors';
import type { ImageFile } from '../file';

/** Bits 0-8 of a refcount table entry are reserved (`REFT_RESERVED_MASK`). */
export const REFT_OFFSET_MASK = 0xfffffffffffffe00n;
export const REFT_RESERVED_MASK = 0x1ffn;
/** QEMU refuses refcount tables larger than 8 MiB (`QCOW_MAX_REFTABLE_SIZE`). */
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
/** qcow2 host offsets are limited to 56 bits; keep to safe integers as well. */
const MAX_HOST_OFFSET = 2 ** 53;

/** Largest refcount a `refcount_order` can hold (capped at 2^53-1 for order 6). */
export function maxRefcount(order: number): number {
  checkOrder(order);
  return order === 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << order) - 1;
}

/** Number of refcount entries in one refcount block. */
export function refblockEntries(clusterBits: number, order: number): number {
  checkOrder(order);
  return ((1 << clusterBits) * 8) >>> order;
}

function checkOrder(order: number): void {
  if (!Number.isInteger(order) || order < 0 || order > 6) throw new RangeError(`refcount_order must be 0..6, got ${order}`);
}

/**
 * Reads entry `index` of a refcount block. Widths below 8 bits are packed LSB-first (entry 0 in
 * bit 0 of byte 0); wider ones are big-endian.
 */
export function getRefcount(block: Uint8Array, index: number, order: number): number {
  const bits = 1 << order;
  if (bits < 8) {
    const bit = index * bits;
    const byte = block[bit >>> 3];
    if (byte === undefined) throw new RangeError(`refcount index ${index} outside the block`);
    return (byte >>> (bit & 7)) & ((1 << bits) - 1);
  }
  const off = index * (bits >>> 3);
  if (off + (bits >>> 3) > block.length || index < 0) throw new RangeError(`refcount index ${index} outside the block`);
  const dv = new DataView(block.buffer, block.byteOffset, block.byteLength);
  switch (bits) {
    case 8:
      return dv.getUint8(off);
    case 16:
      return dv.getUint16(off);
    case 32:
      return dv.getUint32(off);
    default: {
      const v = dv.getBigUint64(off);
      if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
        throw new DiskError('E_QCOW_CORRUPT', `Cannot read refcount: value ${hex(v)} of entry ${index} is larger than vblk supports`);
      }
      return Number(v);
    }
  }
}

/** Writes entry `index` of a refcount block (see `getRefcount` for the layout). */
export function setRefcount(block: Uint8Array, index: number, order: number, value: number): void {
  if (!Number.isSafeInteger(value) || value < 0 || value > maxRefcount(order)) {
    throw new RangeError(`refcount ${value} does not fit in ${1 << order} bits`);
  }
  const bits = 1 << order;
  if (bits < 8) {
    const bit = index * bits;
    const i = bit >>> 3;
    const byte = block[i];
    if (byte === undefined) throw new RangeError(`refcount index ${index} outside the block`);
    const mask = ((1 << bits) - 1) << (bit & 7);
    block[i] = (byte & ~mask) | ((value << (bit & 7)) & mask);
    return;
  }
  const off = index * (bits >>> 3);
  if (off + (bits >>> 3) > block.length || index < 0) throw new RangeError(`refcount index ${index} outside the block`);
  const dv = new DataView(block.buffer, block.byteOffset, block.byteLength);
  switch (bits) {
    case 8:
      dv.setUint8(off, value);
      break;
    case 16:
      dv.setUint16(off, value);
      break;
    case 32:
      dv.setUint32(off, value);
      break;
    default:
      dv.setBigUint64(off, BigInt(value));
  }
}

/**
 * What a refcount structure being checked for a write is: an existing block or the table (either
 * may overlap itself), or a new placement (which may overlap nothing).
 */
export type RefcountStructure = 'refcount-block' | 'refcount-table' | 'new';

/** Geometry and location of an image's refcount structures (from the header). */
export interface RefcountLayout {
  readonly clusterBits: number;
  readonly refcountOrder: number;
  readonly tableOffset: number;
  readonly tableClusters: number;
}

interface CachedBlock {
  readonly data: Uint8Array;
  dirty: boolean;
}

async function readFull(file: ImageFile, buf: Uint8Array, pos: number, what: string): Promise<void> {
  const n = await file.read(buf, pos);
  if (n < buf.length) buf.fill(0, n); // past EOF reads as zeroes (the file may end mid-cluster)
  if (n === 0 && buf.length > 0) {
    throw new DiskError('E_QCOW_CORRUPT', `Cannot read ${what}: offset ${hex(pos)} is past the end of the file`, { offset: pos });
  }
}

/**
 * The refcount table, a write-back LRU cache of refcount blocks, and the cluster allocator.
 *
 * @example
 *   const rc = await RefcountManager.load(file, { clusterBits: 16, refcountOrder: 4, tableOffset: 0x10000, tableClusters: 1 });
 *   const off = await rc.allocate(1); // a free cluster, refcount now 1 (in the cache)
 *   await rc.flush(); await file.sync();
 */
export class RefcountManager {
  readonly file: ImageFile;
  readonly clusterBits: number;
  readonly clusterSize: number;
  readonly order: number;
  /** Refcount entries per block. */
  readonly rbEntries: number;
  #tableOffset: number;
  #tableClusters: number;
  /** Host offsets of refcount blocks (0 = none), one per table entry. */
  #table: number[];
  readonly #cache = new Map<number, CachedBlock>();
  readonly #maxCached: number;
  /** Lowest cluster index that may be free. */
  #freeHint = 0;
  /**
   * Where the search for a run of several clusters starts. Kept apart from `#freeHint` so that a
   * single free hole low in the file does not make every multi-cluster allocation rescan the
   * whole image.
   */
  #runHint = 0;
  /**
   * Host offset → table index of every refcount block (for metadata-overlap checks). Blocks are
   * never freed or moved (a grown table keeps them), so entries are only ever added.
   */
  readonly #blocks = new Map<number, number>();
  /** Called after the table moved (offset, clusters), so the owner can update its header copy. */
  onTableMoved: ((offset: number, clusters: number) => void) | undefined;
  /**
   * Asked before a refcount structure at `[offset, offset + bytes)` is used for a write: a block
   * when it is loaded from the offset the table gives, new blocks and a new table before they
   * are written, the table before an entry is written into it. `what` names the structure for a
   * message, `own` says which kind it is (it may overlap others of its kind: itself). It rejects
   * to refuse. The manager knows only the refcount structures; its owner knows the rest of the
   * image's metadata (the L1 and L2 tables, the snapshot table...).
   */
  guard: ((offset: number, bytes: number, what: string, own: RefcountStructure) => Promise<void>) | undefined;

  private constructor(file: ImageFile, layout: RefcountLayout, table: number[]) {
    this.file = file;
    this.clusterBits = layout.clusterBits;
    this.clusterSize = 2 ** layout.clusterBits;
    this.order = layout.refcountOrder;
    this.rbEntries = refblockEntries(layout.clusterBits, layout.refcountOrder);
    this.#tableOffset = layout.tableOffset;
    this.#tableClusters = layout.tableClusters;
    this.#table = table;
    this.#maxCached = Math.max(16, Math.floor((8 * 1024 * 1024) / this.clusterSize));
    table.forEach((off, i) => {
      if (off !== 0) this.#blocks.set(off, i);
    });
  }

  /** The table index of the refcount block at host offset `offset` (a cluster start), or undefined. */
  blockIndexAt(offset: number): number | undefined {
    return this.#blocks.get(offset);
  }

  /** Reads and validates the refcount table. */
  static async load(file: ImageFile, layout: RefcountLayout): Promise<RefcountManager> {
    checkOrder(layout.refcountOrder);
    const cs = 2 ** layout.clusterBits;
    const bytes = layout.tableClusters * cs;
    if (!Number.isSafeInteger(bytes) || layout.tableClusters < 1 || bytes > MAX_REFTABLE_BYTES) {
      throw new DiskError('E_QCOW_CORRUPT', `Cannot load refcount table: ${layout.tableClusters} clusters is outside 1..${MAX_REFTABLE_BYTES / cs}`);
    }
    if (layout.tableOffset % cs !== 0 || layout.tableOffset === 0) {
      throw new DiskError('E_QCOW_CORRUPT', `Cannot load refcount table: offset ${hex(layout.tableOffset)} is not cluster-aligned`);
    }
    const raw = new Uint8Array(bytes);
    await readFull(file, raw, layout.tableOffset, 'refcount table');
    const dv = new DataView(raw.buffer);
    const table: number[] = [];
    for (let i = 0; i < bytes / 8; i++) {
      const e = dv.getBigUint64(i * 8);
      if ((e & REFT_RESERVED_MASK) !== 0n) {
        throw new DiskError('E_QCOW_CORRUPT', `Cannot load refcount table: entry ${i} (${hex(e)}) has reserved bits set`);
      }
      const off = Number(e & REFT_OFFSET_MASK);
      if (!Number.isSafeInteger(off) || off >= MAX_HOST_OFFSET || off % cs !== 0) {
        throw new DiskError('E_QCOW_CORRUPT', `Cannot load refcount table: refcount block offset ${hex(e)} of entry ${i} is not cluster-aligned`);
      }
      table.push(off);
    }
    return new RefcountManager(file, layout, table);
  }

  get tableOffset(): number {
    return this.#tableOffset;
  }

  get tableClusters(): number {
    return this.#tableClusters;
  }

  /** Refcount block offsets, one per table entry (0 = missing). Do not modify. */
  get table(): readonly number[] {
    return this.#table;
  }

  /** True when some cached refcount block has changes not yet written. */
  get dirty(): boolean {
    for (const b of this.#cache.values()) if (b.dirty) return true;
    return false;
  }

  async #block(rtIdx: number): Promise<CachedBlock | undefined> {
    const off = this.#table[rtIdx];
    if (off === undefined || off === 0) return undefined;
    const hit = this.#cache.get(rtIdx);
    if (hit) {
      this.#cache.delete(rtIdx); // LRU: move to the back
      this.#cache.set(rtIdx, hit);
      return hit;
    }
    // A write of this block may still be in flight (it was evicted meanwhile): reading before it
    // lands would bring back the old counts and lose the increments it carries.
    for (;;) {
      const w = this.#writing.get(off);
      if (!w) break;
      await w.catch(() => undefined);
    }
    const again = this.#cache.get(rtIdx);
    if (again) return again;
    // Changes to the block will be written back here: the offset must not be other metadata.
    await this.guard?.(off, this.clusterSize, `refcount table entry ${rtIdx} has refcount block offset ${hex(off)}`, 'refcount-block');
    const data = new Uint8Array(this.clusterSize);
    await readFull(this.file, data, off, `refcount block ${rtIdx}`);
    const raced = this.#cache.get(rtIdx);
    if (raced) return raced;
    const b: CachedBlock = { data, dirty: false };
    await this.#insert(rtIdx, b);
    return this.#cache.get(rtIdx) ?? b;
  }

  /**
   * Caches block `rtIdx`, evicting least-recently-used blocks first. A block whose write is in
   * flight is never the victim (it is marked clean when the write is issued; dropping it then and
   * reloading it would read the old bytes); a dirty victim is written first and dropped only if
   * it stayed clean.
   */
  async #insert(rtIdx: number, b: CachedBlock): Promise<void> {
    while (this.#cache.size >= this.#maxCached) {
      let victim: [number, CachedBlock] | undefined;
      for (const e of this.#cache) {
        if (!this.#writing.has(this.#table[e[0]] ?? 0)) {
          victim = e;
          break;
        }
      }
      if (!victim) {
        await Promise.race([...this.#writing.values()].map((p) => p.catch(() => undefined)));
        continue;
      }
      const [k, v] = victim;
      if (v.dirty) await this.#writeBlock(k, v);
      if (!v.dirty && !this.#writing.has(this.#table[k] ?? 0) && this.#cache.get(k) === v) this.#cache.delete(k);
    }
    this.#cache.set(rtIdx, b);
  }

  /** The last write issued per block offset: writes of one block are never in flight together. */
  readonly #writing = new Map<number, Promise<void>>();

  async #writeBlock(rtIdx: number, b: CachedBlock): Promise<void> {
    const off = this.#table[rtIdx];
    if (off === undefined || off === 0) throw new RangeError(`refcount block ${rtIdx} has no offset`);
    b.dirty = false;
    // Two writes of the same block in flight could land in either order (an older copy last), so
    // each waits for the previous one; the bytes are copied when the write is issued.
    const prev = this.#writing.get(off);
    const p = (prev ?? Promise.resolve()).catch(() => undefined).then(() => this.file.write(b.data.slice(), off));
    this.#writing.set(off, p);
    try {
      await p;
    } catch (e) {
      b.dirty = true;
      throw e;
    } finally {
      if (this.#writing.get(off) === p) this.#writing.delete(off);
    }
  }

  /** Refcount of the cluster with index `cluster` (0 where no block covers it). */
  async get(cluster: number): Promise<number> {
    const b = await this.#block(Math.floor(cluster / this.rbEntries));
    return b ? getRefcount(b.data, cluster % this.rbEntries, this.order) : 0;
  }

  /** Refcount of the cluster containing host offset `offset`. */
  getAt(offset: number): Promise<number> {
    return this.get(Math.floor(offset / this.clusterSize));
  }

  /**
   * Changes the refcount of cluster `cluster` by `delta` in the cache (the covering block must
   * exist: `allocate` creates blocks). Rejects on underflow or overflow.
   */
  async adjust(cluster: number, delta: number): Promise<number> {
    const rtIdx = Math.floor(cluster / this.rbEntries);
    const b = await this.#block(rtIdx);
    if (!b) throw new DiskError('E_QCOW_CORRUPT', `Cannot change refcount of cluster ${cluster}: no refcount block covers it`);
    const idx = cluster % this.rbEntries;
    const old = getRefcount(b.data, idx, this.order);
    const next = old + delta;
    if (next < 0) throw new DiskError('E_QCOW_CORRUPT', `Cannot decrease refcount of cluster ${cluster} (offset ${hex(cluster * this.clusterSize)}): it is already ${old}`);
    if (next > maxRefcount(this.order)) {
      throw new DiskError('E_QCOW_UNSUPPORTED', `Cannot increase refcount of cluster ${cluster}: ${next} does not fit in ${1 << this.order} bits`);
    }
    setRefcount(b.data, idx, this.order, next);
    b.dirty = true;
    if (next === 0) this.#noteFree(cluster);
    return next;
  }

  /** Sets the refcount of `cluster` (repair); the covering block must exist. */
  async set(cluster: number, value: number): Promise<void> {
    const b = await this.#block(Math.floor(cluster / this.rbEntries));
    if (!b) throw new DiskError('E_QCOW_CORRUPT', `Cannot set refcount of cluster ${cluster}: no refcount block covers it`);
    setRefcount(b.data, cluster % this.rbEntries, this.order, value);
    b.dirty = true;
    if (value === 0) this.#noteFree(cluster);
  }

  #noteFree(cluster: number): void {
    if (cluster < this.#freeHint) this.#freeHint = cluster;
    if (cluster < this.#runHint) this.#runHint = cluster;
  }

  /** Decrements the refcount of every cluster in `[offset, offset + bytes)` by one. */
  async release(offset: number, bytes: number): Promise<void> {
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + bytes - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) await this.adjust(c, -1);
  }

  /** True when cluster `c` is free: no table entry, no block, or refcount 0. */
  async #isFree(c: number): Promise<boolean> {
    const rtIdx = Math.floor(c / this.rbEntries);
    if (rtIdx >= this.#table.length || (this.#table[rtIdx] ?? 0) === 0) return true;
    const b = await this.#block(rtIdx);
    return b ? getRefcount(b.data, c % this.rbEntries, this.order) === 0 : true;
  }

  /** Number of ranges without a refcount block among those that `[start, end)` touches. */
  #missingBlocks(start: number, end: number): number {
    let m = 0;
    for (let r = Math.floor(start / this.rbEntries); r <= Math.floor((end - 1) / this.rbEntries); r++) {
      if (r >= this.#table.length || (this.#table[r] ?? 0) === 0) m++;
    }
    return m;
  }

  /**
   * Allocates `count` contiguous free clusters (refcount 0 → 1, in the cache) and returns the host
   * offset of the first. Freed clusters are reused (lowest first); the image grows otherwise.
   *
   * Ranges without a refcount block are free. When the run touches such ranges, their new blocks
   * go right after the run (so they never split it), describe each other, and are written and
   * hooked into the table before this returns.
   */
  async allocate(count: number): Promise<number> {
    if (!Number.isSafeInteger(count) || count < 1) throw new RangeError(`cluster count must be positive, got ${count}`);
    for (;;) {
      const from = count === 1 ? this.#freeHint : Math.max(this.#freeHint, this.#runHint);
      let start = from;
      let len = 0; // free clusters from `start`
      let m = 0;
      for (let c = from; len < count + m; c++) {
        if ((c + 1) * this.clusterSize > MAX_HOST_OFFSET) {
          throw new DiskError('E_DISK_FULL', `Cannot allocate ${count} clusters: the image would grow past ${hex(MAX_HOST_OFFSET)}`);
        }
        if (await this.#isFree(c)) {
          if (len === 0) start = c;
          len++;
          m = this.#missingBlocks(start, start + len);
        } else {
          len = 0;
          m = 0;
          if (c === this.#freeHint) this.#freeHint = c + 1;
        }
      }
      const end = start + count + m;
      const lastRange = Math.floor((end - 1) / this.rbEntries);
      if (lastRange >= this.#table.length) {
        // The table itself must grow first; its new home may overlap this run, so search again.
        await this.#growTable(lastRange);
        continue;
      }
      if (m > 0) await this.#addBlocks(start, count, m);
      for (let c = start; c < start + count; c++) await this.adjust(c, 1);
      if (start === this.#freeHint) this.#freeHint = start + count + m;
      if (count > 1) this.#runHint = start + count + m;
      return start * this.clusterSize;
    }
  }

  /**
   * Creates the `m` missing refcount blocks for the ranges touched by `[start, start+count+m)`,
   * placed at `start+count ...`. Every block cluster is counted (by a new block or an existing
   * one); everything is written and synced before the table entries, which are synced too.
   */
  async #addBlocks(start: number, count: number, m: number): Promise<void> {
    const end = start + count + m;
    const ranges: number[] = [];
    for (let r = Math.floor(start / this.rbEntries); r <= Math.floor((end - 1) / this.rbEntries); r++) {
      if ((this.#table[r] ?? 0) === 0) ranges.push(r);
    }
    if (ranges.length !== m) throw new RangeError(`refcount block count mismatch: ${ranges.length} != ${m}`);
    const cs = this.clusterSize;
    await this.guard?.((start + count) * cs, m * cs, `the range of new refcount blocks at ${hex((start + count) * cs)}`, 'new');
    for (const r of ranges) await this.guard?.(this.#tableOffset + r * 8, 8, `the refcount table at ${hex(this.#tableOffset)}`, 'refcount-table');
    const fresh = new Map<number, CachedBlock>();
    ranges.forEach((r, j) => {
      fresh.set(r, { data: new Uint8Array(this.clusterSize), dirty: false });
      this.#table[r] = (start + count + j) * this.clusterSize;
    });
    try {
      for (let j = 0; j < m; j++) {
        const c = start + count + j;
        const r = Math.floor(c / this.rbEntries);
        const nb = fresh.get(r);
        if (nb) setRefcount(nb.data, c % this.rbEntries, this.order, 1);
        else await this.adjust(c, 1); // an existing block (loaded through the cache)
      }
      for (const [r, nb] of fresh) await this.file.write(nb.data, this.#table[r] ?? 0);
      await this.flush();
      await this.file.sync();
    } catch (e) {
      for (const r of ranges) this.#table[r] = 0;
      throw e;
    }
    const entry = new Uint8Array(8);
    const dv = new DataView(entry.buffer);
    for (const r of ranges) {
      dv.setBigUint64(0, BigInt(this.#table[r] ?? 0));
      await this.file.write(entry, this.#tableOffset + r * 8);
    }
    await this.file.sync();
    for (const r of ranges) this.#blocks.set(this.#table[r] ?? 0, r);
    for (const [r, nb] of fresh) await this.#insert(r, nb);
  }

  /**
   * Grows the refcount table so that entry `needIdx` exists. The new table and the refcount blocks
   * that describe it go to the first range the old table does not cover (all free), the header
   * switches to it after it is durable, and then the old table's clusters are released.
   */
  async #growTable(needIdx: number): Promise<void> {
    const cs = this.clusterSize;
    const oldEntries = this.#table.length;
    const g = oldEntries; // first uncovered range: every cluster in it is free
    const base = g * this.rbEntries;
    let tableClusters = Math.ceil((Math.max(needIdx + 1, oldEntries * 2) * 8) / cs);
    let k = 1;
    for (;;) {
      k = Math.max(1, Math.ceil((k + tableClusters) / this.rbEntries));
      const k2 = Math.ceil((k + tableClusters) / this.rbEntries);
      if (k2 !== k) continue;
      if ((tableClusters * cs) / 8 < g + k) {
        tableClusters++;
        continue;
      }
      break;
    }
    if (tableClusters * cs > MAX_REFTABLE_BYTES) {
      throw new DiskError('E_QCOW_UNSUPPORTED', `Cannot grow refcount table: ${tableClusters} clusters exceed the ${MAX_REFTABLE_BYTES}-byte limit`);
    }
    await this.guard?.(base * cs, (k + tableClusters) * cs, `the range of a new refcount table and its blocks at ${hex(base * cs)}`, 'new');
    const used = k + tableClusters;
    const blocks: Uint8Array[] = [];
    for (let j = 0; j < k; j++) {
      const data = new Uint8Array(cs);
      for (let c = j * this.rbEntries; c < Math.min(used, (j + 1) * this.rbEntries); c++) setRefcount(data, c - j * this.rbEntries, this.order, 1);
      blocks.push(data);
    }
    const newTable = this.#table.slice();
    while (newTable.length < (tableClusters * cs) / 8) newTable.push(0);
    for (let j = 0; j < k; j++) newTable[g + j] = (base + j) * cs;
    const tableOffset = (base + k) * cs;
    const raw = new Uint8Array(tableClusters * cs);
    const dv = new DataView(raw.buffer);
    newTable.forEach((off, i) => dv.setBigUint64(i * 8, BigInt(off)));
    for (let j = 0; j < k; j++) {
      const blk = blocks[j];
      if (blk) await this.file.write(blk, (base + j) * cs);
    }
    await this.file.write(raw, tableOffset);
    await this.file.sync();
    const hdr = new Uint8Array(12);
    const hv = new DataView(hdr.buffer);
    hv.setBigUint64(0, BigInt(tableOffset));
    hv.setUint32(8, tableClusters);
    await this.file.write(hdr, 48); // refcount_table_offset, refcount_table_clusters
    await this.file.sync();
    const oldOffset = this.#tableOffset;
    const oldClusters = this.#tableClusters;
    this.#table = newTable;
    this.#tableOffset = tableOffset;
    this.#tableClusters = tableClusters;
    for (let j = 0; j < k; j++) {
      this.#blocks.set((base + j) * cs, g + j);
      const blk = blocks[j];
      if (blk) await this.#insert(g + j, { data: blk, dirty: false });
    }
    this.onTableMoved?.(tableOffset, tableClusters);
    await this.release(oldOffset, oldClusters * cs);
  }

  /**
   * Writes every dirty refcount block and waits for every block write in flight (no sync: the
   * caller orders it). A block that a concurrent flush (an L2 eviction, outside the metadata lock)
   * has already marked clean may still be on its way to the file: the caller's sync must come
   * after it lands, or a reference could become durable before the refcount it relies on.
   */
  async flush(): Promise<void> {
    for (const [k, b] of this.#cache) if (b.dirty) await this.#writeBlock(k, b);
    while (this.#writing.size > 0) await Promise.all([...this.#writing.values()]);
  }

  /** Drops the cache without writing (after a failed write, or before a full rebuild). */
  discardCache(): void {
    this.#cache.clear();
  }

  /** Index one past the last cluster any refcount block could describe as used (for scans). */
  get coveredClusters(): number {
    return this.#table.length * this.rbEntries;
  }

  /** Restarts the free-cluster search from cluster 0 (after a repair). */
  resetHint(): void {
    this.#freeHint = 0;
    this.#runHint = 0;
  }
}
