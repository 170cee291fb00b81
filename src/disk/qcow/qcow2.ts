/**
 * qcow2 (versions 2 and 3): the per-image state and the read-only ops table.
 *
 * Spec: QEMU docs/interop/qcow2.rst; reference/qcow2.md sections 1.1-1.5. The read path:
 *   guest offset -> L1 entry (in memory) -> L2 table (LRU cache) -> L2 entry -> host offset,
 * with contiguous host ranges of one request coalesced into one pread, unallocated ranges read
 * from the backing file (or as zeroes), zero clusters as zeroes and compressed clusters inflated.
 *
 * `Qcow2State` is the object the read-write table (qcow2-rw.ts) builds on: it exposes the parsed
 * header, the L1 table (decoded words), the L2 cache, the file and the backing image.
 *
 * Policy decisions (documented in docs/disk.md):
 * - An L2 entry whose data cluster starts past the end of the file is an error naming the entry
 *   (QEMU returns zeroes there; we prefer not to make data up).
 * - An L2 or L1 entry whose offset is not cluster-aligned is an error naming the entry.
 * - Reserved bits in L1/L2 entries are ignored on read (QEMU does the same; `check` reports them).
 */
import { DiskError, hex } from '../../errors';
import { DiskImage } from '../disk-image';
import type { ImageFile } from '../file';
import type { BlockStatus, DiskHandle, DiskImageOps, ImageDescription, ImageFormat } from '../types';
import {
  Qcow2Header,
  INCOMPAT_KNOWN,
  INCOMPAT_DATA_FILE,
  INCOMPAT_COMPRESSION,
  INCOMPAT_EXTL2,
  INCOMPAT_DIRTY,
  INCOMPAT_CORRUPT,
  COMPAT_LAZY_REFCOUNTS,
  COMPRESSION_DEFLATE,
} from './header';
import { L2Cache, L2Table } from './l2-cache';
import { assertCompressionSupported, inflateCluster } from './compress';
import { readBytesAt, backingStatus, type ByteReader } from './chain';
import { MAX_REFTABLE_BYTES, REFT_OFFSET_MASK, getRefcount, refblockEntries } from './refcount';
import { QCOW2_HI_COMPRESSED, qcow2Compressed, qcow2Offset, wordsEntry } from './entry';

/** QEMU's limit on the L1 table (QCOW_MAX_L1_SIZE, 32 MiB = 4 Mi entries). */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
/** QEMU's limit on internal snapshots. */
export const MAX_SNAPSHOTS = 65536;
/** Default amount of L2 tables kept in memory (covers 256 GiB of guest at 64 KiB clusters). */
export const DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024;

/** Cluster kinds of the read path (qcow2_get_subcluster_type, simplified for reading). */
export enum Kind {
  Unallocated = 0,
  Zero = 1,
  Data = 2,
  Compressed = 3,
}

/** Result of `Qcow2State.lookup`. */
export interface ClusterMapping {
  readonly kind: Kind;
  /** Bytes from the offset to the end of its (sub)cluster, or of the L2 range when `table` is null. */
  readonly bytes: number;
  readonly l1Index: number;
  /** Index of the entry in its L2 table. */
  readonly l2Index: number;
  /** The L2 table (null when the L1 entry is unallocated). */
  readonly table: L2Table | null;
  /** Host offset of `offset` itself (Data, ZERO_ALLOC, allocated-but-unallocated subcluster). */
  readonly host?: number;
  /** The raw compressed L2 entry (Compressed). */
  readonly entry?: bigint;
}

/** Options of `openQcow2`. */
export interface Qcow2OpenOptions {
  /** Name used in messages and for resolving a relative backing file name. */
  readonly path: string;
  /** Bytes of L2 tables to cache (default 32 MiB, at least 4 tables). */
  readonly l2CacheBytes?: number;
  /** Opens the backing file (name from the header, format from the extension); undefined = do not open. */
  readonly openBacking?: (name: string, format: ImageFormat | undefined) => Promise<DiskImage | undefined>;
}


/** The state of an open qcow2 image (`DiskImage.priv`). */
export class Qcow2State implements ByteReader {
  /** Whether the image looks metadata-preallocated (decided once, at the first block status). */
  #metadataPreallocated: Promise<boolean> | undefined;
  readonly path: string;
  readonly file: ImageFile;
  readonly header: Qcow2Header;
  readonly clusterBits: number;
  readonly clusterSize: number;
  /** Entries per L2 table. */
  readonly l2Entries: number;
  /** Extended L2 (subclusters). */
  readonly extL2: boolean;
  /** log2 of the subcluster size (= clusterBits without extended L2). */
  readonly subclusterBits: number;
  readonly subclusterSize: number;
  /** Virtual size in bytes. */
  readonly size: number;
  /** L1 table decoded to native words: entry i is (l1[2i] << 32) | l1[2i+1]. */
  l1: Uint32Array;
  /** Number of L1 entries (header.l1Size). */
  l1Size: number;
  readonly l2Cache: L2Cache;
  /** The backing image, if any (any format). */
  backing: DiskImage | undefined;
  /** Size of the image file; the write path must raise it when it grows the file. */
  fileSize: number;
  /** The last inflated cluster (sequential reads of compressed images inflate each cluster once). */
  #inflated: { host: number; data: Promise<Buffer> } | undefined;

  // Result registers of #classify (kept as fields so the hot path allocates nothing).
  #kind: Kind = Kind.Unallocated;
  #host = 0;
  #run = 0;
  #centry = 0n;

  constructor(init: { path: string; file: ImageFile; header: Qcow2Header; l1: Uint32Array; fileSize: number; l2CacheBytes: number }) {
    const h = init.header;
    this.path = init.path;
    this.file = init.file;
    this.header = h;
    this.clusterBits = h.clusterBits;
    this.clusterSize = h.clusterSize;
    this.extL2 = (h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
    this.l2Entries = h.l2Entries;
    this.subclusterBits = this.extL2 ? h.clusterBits - 5 : h.clusterBits;
    this.subclusterSize = 2 ** this.subclusterBits;
    this.size = h.size;
    this.l1 = init.l1;
    this.l1Size = h.l1Size;
    this.fileSize = init.fileSize;
    this.backing = undefined;
    const capacity = Math.max(4, Math.min(65536, Math.floor(init.l2CacheBytes / this.clusterSize)));
    this.l2Cache = new L2Cache({
      capacity,
      tableBytes: this.clusterSize,
      stride: this.extL2 ? 4 : 2,
      read: (buf, off) => this.file.read(buf, off),
    });
  }

  /** Bytes of guest address space one L2 table covers. */
  get l2Coverage(): number {
    return this.l2Entries * this.clusterSize;
  }

  /** The L2 table offset in L1 entry `i` (0 = unallocated), validated. */
  l2Offset(i: number): number {
    const off = this.rawL2Offset(i);
    if (off === 0) return 0;
    const problem = this.l2OffsetProblem(i, off);
    if (problem !== undefined) throw new DiskError('E_QCOW_CORRUPT', `Cannot read ${this.path}: ${problem}`, { l1Index: i });
    return off;
  }

  /** The L2 table offset in L1 entry `i` as it is on disk (0 = unallocated), not validated. */
  rawL2Offset(i: number): number {
    return qcow2Offset(this.l1[2 * i] ?? 0, this.l1[2 * i + 1] ?? 0);
  }

  /**
   * Why the L2 table offset of L1 entry `i` cannot be used, naming the entry, or undefined when
   * it can (or the entry is unallocated): it must be cluster-aligned and the table inside the
   * file. The read and the write paths both ask here.
   * (`off` is the entry's raw offset, passed by callers that have it already.)
   */
  l2OffsetProblem(i: number, off = this.rawL2Offset(i)): string | undefined {
    if (off === 0) return undefined;
    if (off % this.clusterSize !== 0) return `L1 entry ${i} (${hex(wordsEntry(this.l1[2 * i] ?? 0, this.l1[2 * i + 1] ?? 0))}) has L2 table offset ${hex(off)}, not cluster-aligned`;
    if (off + this.clusterSize > this.fileSize) return `L1 entry ${i} points to L2 table ${hex(off)} past the end of the file (size ${hex(this.fileSize)})`;
    return undefined;
  }

  /** The L2 table covering guest offset `off`: a table, null (unallocated L1 entry), or a promise when not cached. */
  #table(l1i: number): L2Table | null | Promise<L2Table> {
    const l2off = this.l2Offset(l1i);
    if (l2off === 0) return null;
    return this.l2Cache.peek(l2off) ?? this.l2Cache.get(l2off);
  }

  /**
   * Classifies the (sub)cluster at guest offset `cur` given its L2 table; sets #kind, #host (host
   * offset of `cur` for Data / of the compressed stream for Compressed) and #run (bytes until the
   * end of the (sub)cluster or, for an unallocated L1 entry, of the L2 range).
   */
  #classify(cur: number, table: L2Table | null, l1i: number): void {
    const cs = this.clusterSize;
    if (table === null) {
      this.#kind = Kind.Unallocated;
      this.#host = -1;
      this.#run = (l1i + 1) * this.l2Coverage - cur;
      return;
    }
    const ci = Math.floor(cur / cs);
    const l2i = ci - l1i * this.l2Entries;
    const inCluster = cur - ci * cs;
    const w = table.words;
    const s = table.stride * l2i;
    const hi = w[s] ?? 0;
    const lo = w[s + 1] ?? 0;
    if (hi & QCOW2_HI_COMPRESSED) {
      this.#kind = Kind.Compressed;
      this.#centry = wordsEntry(hi, lo);
      this.#run = cs - inCluster;
      return;
    }
    const host = qcow2Offset(hi, lo);
    if (!this.extL2) {
      this.#run = cs - inCluster;
      if (lo & 1) {
        this.#kind = Kind.Zero;
        this.#host = host === 0 ? -1 : host + inCluster; // ZERO_ALLOC keeps its offset
        return;
      }
      if (host === 0) {
        this.#kind = Kind.Unallocated;
        this.#host = -1;
        return;
      }
      this.#checkData(host, table, l2i);
      this.#kind = Kind.Data;
      this.#host = host + inCluster;
      return;
    }
    // Extended L2: bitmap word w[s+2] = zero flags (bits 32..63), w[s+3] = allocation flags.
    const sc = inCluster >>> this.subclusterBits;
    const bit = 1 << sc;
    const zero = (w[s + 2] ?? 0) & bit;
    const alloc = (w[s + 3] ?? 0) & bit;
    this.#run = (sc + 1) * this.subclusterSize - inCluster;
    if (zero && alloc) {
      throw new DiskError('E_QCOW_CORRUPT', `Cannot read ${this.path}: L2 entry ${l2i} of table ${hex(table.offset)} marks subcluster ${sc} both allocated and zero`, { l2Index: l2i });
    }
    if (zero) {
      this.#kind = Kind.Zero;
      this.#host = host === 0 ? -1 : host + inCluster;
      return;
    }
    if (!alloc) {
      // UNALLOCATED_ALLOC (cluster allocated, subcluster not): reads go to the backing file, but
      // qemu-img map still reports the host offset when no backing file answers.
      this.#kind = Kind.Unallocated;
      this.#host = host === 0 ? -1 : host + inCluster;
      return;
    }
    if (host === 0) {
      throw new DiskError('E_QCOW_CORRUPT', `Cannot read ${this.path}: L2 entry ${l2i} of table ${hex(table.offset)} allocates subcluster ${sc} of an unallocated cluster`, { l2Index: l2i });
    }
    this.#checkData(host, table, l2i);
    this.#kind = Kind.Data;
    this.#host = host + inCluster;
  }

  #checkData(host: number, table: L2Table, l2i: number): void {
    const problem = this.dataClusterProblem(host);
    if (problem !== undefined) {
      throw new DiskError('E_QCOW_CORRUPT', `Cannot read ${this.path}: L2 entry ${l2i} of table ${hex(table.offset)} (${hex(table.entry(l2i))}) ${problem}`, {
        l2Index: l2i,
        table: table.offset,
      });
    }
  }

  /**
   * Why the data cluster offset `host` read from an L2 entry cannot be used, or undefined when
   * it can: it must be cluster-aligned and start inside the file. The read and the write paths
   * both ask here, so an offset one refuses the other refuses too.
   */
  dataClusterProblem(host: number): string | undefined {
    if (host % this.clusterSize !== 0) return `has data offset ${hex(host)}, not cluster-aligned`;
    if (host >= this.fileSize) return `points to cluster ${hex(host)} past the end of the file (size ${hex(this.fileSize)})`;
    return undefined;
  }

  /**
   * The mapping of the (sub)cluster at guest offset `offset` (for the write path, tools and
   * tests; the read path uses the allocation-free internal form).
   */
  async lookup(offset: number): Promise<ClusterMapping> {
    if (!Number.isSafeInteger(offset) || offset < 0 || offset >= this.size) throw new RangeError(`offset ${offset} is outside the disk`);
    const l1i = Math.floor(offset / this.l2Coverage);
    let t = this.#table(l1i);
    if (t instanceof Promise) t = await t;
    this.#classify(offset, t, l1i);
    const l2Index = Math.floor(offset / this.clusterSize) - l1i * this.l2Entries;
    const m: ClusterMapping = { kind: this.#kind, bytes: this.#run, l1Index: l1i, l2Index, table: t };
    if (this.#kind === Kind.Compressed) return { ...m, entry: this.#centry };
    return this.#host >= 0 ? { ...m, host: this.#host } : m;
  }

  /** Host offset and byte length of the compressed stream of an entry. */
  compressedExtent(entry: bigint): { host: number; length: number } {
    const { host, sectors } = qcow2Compressed(entry, this.clusterBits);
    return { host, length: sectors * 512 - (host % 512) };
  }

  /**
   * Why the compressed stream offset `host` read from an L2 entry cannot be used, or undefined
   * when it can (it starts inside the file). Reads and writes both ask here.
   */
  compressedProblem(host: number): string | undefined {
    if (host >= this.fileSize) return `compressed cluster at ${hex(host)} is past the end of the file (size ${hex(this.fileSize)})`;
    return undefined;
  }

  /** Reads and inflates the compressed cluster described by `entry` (cached for the next request). */
  #inflate(entry: bigint): Promise<Buffer> {
    const { host, length } = this.compressedExtent(entry);
    if (this.#inflated && this.#inflated.host === host) return this.#inflated.data;
    const data = (async () => {
      const problem = this.compressedProblem(host);
      if (problem !== undefined) throw new DiskError('E_QCOW_CORRUPT', `Cannot read ${this.path}: ${problem}`, { offset: host });
      const raw = Buffer.allocUnsafe(Math.min(length, this.fileSize - host));
      const n = await this.file.read(raw, host);
      return inflateCluster(raw.subarray(0, n), this.clusterSize, host);
    })();
    const slot = { host, data };
    this.#inflated = slot;
    data.catch(() => {
      if (this.#inflated === slot) this.#inflated = undefined;
    });
    return data;
  }

  /** Forgets the cached inflated cluster (the write path calls this when it frees clusters). */
  dropInflated(): void {
    this.#inflated = undefined;
  }

  #readData(buf: Uint8Array, host: number): Promise<void> {
    // A data cluster that the file only partly covers (the file was cut short after the cluster
    // start was checked): the rest is a hole of the host file and reads as zeroes, as in QEMU.
    return this.file.read(buf, host).then((n) => {
      if (n < buf.length) buf.fill(0, n);
    });
  }

  async #readCompressed(buf: Uint8Array, entry: bigint, inCluster: number): Promise<void> {
    const data = await this.#inflate(entry);
    buf.set(data.subarray(inCluster, inCluster + buf.length));
  }

  #readUnallocated(buf: Uint8Array, cur: number): Promise<void> | undefined {
    if (this.backing) return readBytesAt(this.backing, cur, buf);
    buf.fill(0);
    return undefined;
  }

  /**
   * Hot path: a request inside one cluster whose L2 table is cached and which maps to data is one
   * pread with no further bookkeeping. Returns undefined when the general path is needed.
   */
  readFast(offset: number, buf: Uint8Array): Promise<void> | undefined {
    const cs = this.clusterSize;
    const ci = Math.floor(offset / cs);
    if (offset + buf.length > (ci + 1) * cs || offset + buf.length > this.size) return undefined;
    const l1i = Math.floor(ci / this.l2Entries);
    const l2off = this.l2Offset(l1i);
    if (l2off === 0) return undefined;
    const t = this.l2Cache.peek(l2off);
    if (!t) return undefined;
    this.#classify(offset, t, l1i);
    if (this.#kind !== Kind.Data) return undefined;
    return this.#readData(buf, this.#host);
  }

  /**
   * Reads `buf.length` bytes at guest offset `offset` (any alignment); bytes past the virtual size
   * read as zeroes (used when this image is someone's backing file).
   */
  async readAt(offset: number, buf: Uint8Array): Promise<void> {
    const len = buf.length;
    const end = Math.min(offset + len, this.size);
    if (end < offset + len) buf.fill(0, Math.max(0, end - offset));
    const pending: Promise<void>[] = [];
    let segKind: Kind | undefined;
    let segStart = 0; // position in buf
    let segLen = 0;
    let segHost = 0;
    const flush = (): void => {
      if (segLen === 0) return;
      const sub = buf.subarray(segStart, segStart + segLen);
      if (segKind === Kind.Data) pending.push(this.#readData(sub, segHost));
      else if (segKind === Kind.Zero) sub.fill(0);
      else {
        const p = this.#readUnallocated(sub, offset + segStart);
        if (p) pending.push(p);
      }
      segLen = 0;
    };
    let cur = offset;
    while (cur < end) {
      const l1i = Math.floor(cur / this.l2Coverage);
      let t = this.#table(l1i);
      if (t instanceof Promise) t = await t;
      this.#classify(cur, t, l1i);
      const n = Math.min(this.#run, end - cur);
      const pos = cur - offset;
      const kind = this.#kind;
      if (kind === Kind.Compressed) {
        flush();
        const inCluster = cur % this.clusterSize;
        pending.push(this.#readCompressed(buf.subarray(pos, pos + n), this.#centry, inCluster));
      } else if (segLen > 0 && kind === segKind && (kind !== Kind.Data || segHost + segLen === this.#host)) {
        segLen += n;
      } else {
        flush();
        segKind = kind;
        segStart = pos;
        segLen = n;
        segHost = this.#host;
      }
      cur += n;
    }
    flush();
    if (pending.length === 1) await pending[0];
    else if (pending.length > 1) await Promise.all(pending);
  }

  /** Allocation status of the run starting at `offset` (like `qemu-img map`), at most `length` bytes. */
  async blockStatus(offset: number, length: number): Promise<BlockStatus> {
    const end = Math.min(offset + length, this.size);
    let cur = offset;
    let kind: Kind | undefined;
    let host = -1;
    let total = 0;
    while (cur < end) {
      const l1i = Math.floor(cur / this.l2Coverage);
      let t = this.#table(l1i);
      if (t instanceof Promise) t = await t;
      this.#classify(cur, t, l1i);
      const n = Math.min(this.#run, end - cur);
      const k = this.#kind;
      const h = k === Kind.Compressed ? -1 : this.#host;
      if (kind === undefined) {
        kind = k;
        host = h;
      } else if (k !== kind || k === Kind.Compressed || (host === -1 ? h !== -1 : h !== host + total)) {
        break;
      }
      total += n;
      cur += n;
      if (k === Kind.Compressed) break;
    }
    const at = host === -1 ? {} : { offset: host, filename: this.path };
    if (kind === Kind.Data) {
      // qemu asks the host file (BDRV_BLOCK_RECURSE) only on images it takes for
      // metadata-preallocated: there, data clusters over a host hole read as zeroes.
      // The guess is extra information: a refcount structure it cannot read means "no".
      this.#metadataPreallocated ??= this.#detectMetadataPreallocation().catch(() => false);
      const e = (await this.#metadataPreallocated) ? this.file.extent?.(host, total) : undefined;
      return { length: e?.length ?? total, present: true, zero: e !== undefined && !e.data, data: true, depth: 0, ...at };
    }
    if (kind === Kind.Compressed) return { length: total, present: true, zero: false, data: true, depth: 0, filename: this.path };
    if (kind === Kind.Zero) return { length: total, present: true, zero: true, data: false, depth: 0, ...at };
    if (this.backing && offset < this.backing.size) {
      return backingStatus(this.backing, offset, Math.min(total, this.backing.size - offset), 1);
    }
    return { length: total, present: false, zero: true, data: false, depth: 0, ...at };
  }

  /**
   * qemu's qcow2_detect_metadata_preallocation: the image counts as metadata-preallocated when
   * the clusters of the file with a nonzero refcount reach max(10/9 x, 2 +) the clusters the file
   * really occupies on disk. False when the file cannot tell its allocated size.
   */
  async #detectMetadataPreallocation(): Promise<boolean> {
    const allocated = await this.file.allocatedBytes?.();
    if (allocated === undefined) return false;
    const cs = this.clusterSize;
    const real = Math.floor(allocated / cs);
    const threshold = Math.max(Math.floor((real * 10) / 9), real + 2);
    const endCluster = Math.ceil((await this.file.size()) / cs);
    const h = this.header;
    const table = new Uint8Array(h.refcountTableClusters * cs);
    await this.file.read(table, h.refcountTableOffset);
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    const perBlock = refblockEntries(this.clusterBits, h.refcountOrder);
    const block = new Uint8Array(cs);
    let count = 0;
    for (let first = 0; first < endCluster && count < threshold; first += perBlock) {
      const rtIdx = first / perBlock;
      if ((rtIdx + 1) * 8 > table.length) break;
      const off = Number(view.getBigUint64(rtIdx * 8) & REFT_OFFSET_MASK);
      if (off === 0) continue;
      block.fill(0);
      await this.file.read(block, off);
      const n = Math.min(perBlock, endCluster - first);
      for (let i = 0; i < n && count < threshold; i++) if (getRefcount(block, i, h.refcountOrder) !== 0) count++;
    }
    return count >= threshold;
  }

  /** Facts for `vblk info` (qemu-img info field names). */
  describe(): ImageDescription {
    const h = this.header;
    const data: Record<string, unknown> = { compat: h.version === 2 ? '0.10' : '1.1', 'compression-type': h.compressionType === COMPRESSION_DEFLATE ? 'zlib' : 'zstd' };
    if (h.version === 3) data['lazy-refcounts'] = (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n;
    data['refcount-bits'] = h.refcountBits;
    if (h.version === 3) {
      data['corrupt'] = (h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n;
      data['extended-l2'] = this.extL2;
    }
    const d: { -readonly [K in keyof ImageDescription]: ImageDescription[K] } = {
      format: 'qcow2',
      virtualSize: this.size,
      clusterSize: this.clusterSize,
      dirty: (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n,
      formatSpecific: { type: 'qcow2', data },
    };
    if (h.backingFile !== undefined) {
      d.backingFile = h.backingFile;
      d.fullBackingFilename = combinePath(this.path, h.backingFile);
      if (h.backingFormat !== undefined) d.backingFormat = h.backingFormat;
    }
    return d;
  }
}

/** QEMU's path_combine: a relative name is taken relative to the folder of `base`. */
export function combinePath(base: string, name: string): string {
  if (name.startsWith('/')) return name;
  const slash = base.lastIndexOf('/');
  return slash < 0 ? name : base.slice(0, slash + 1) + name;
}

function unsupported(path: string, what: string, feature: string): DiskError {
  return new DiskError('E_QCOW_UNSUPPORTED', `Cannot open ${path}: unsupported qcow2 feature: ${what}`, { feature });
}

function corruptAt(path: string, msg: string, field: string): DiskError {
  return new DiskError('E_QCOW_CORRUPT', `Cannot open ${path}: ${msg}`, { field });
}

/** Refuses features the read path does not implement, naming them (before anything else is read). */
export function assertReadable(path: string, h: Qcow2Header): void {
  const unknown = h.incompatibleFeatures & ~INCOMPAT_KNOWN;
  if (unknown !== 0n) {
    const names: string[] = [];
    for (let bit = 0n; bit < 64n; bit++) {
      if (!(unknown & (1n << bit))) continue;
      const named = h.featureTable?.find((f) => f.type === 0 && BigInt(f.bit) === bit);
      names.push(named ? named.name : `unknown incompatible feature ${(1n << bit).toString(16).padStart(16, '0')}`);
    }
    throw unsupported(path, names.join(', '), 'incompatible-features');
  }
  if (h.incompatibleFeatures & INCOMPAT_DATA_FILE || h.dataFile !== undefined) {
    throw unsupported(path, `external data file${h.dataFile !== undefined ? ` (${h.dataFile})` : ''}`, 'data-file');
  }
  if (h.cryptMethod !== 0) {
    const kind = h.cryptMethod === 1 ? 'AES' : h.cryptMethod === 2 ? 'LUKS' : 'unknown';
    throw unsupported(path, `encryption (crypt_method ${h.cryptMethod}, ${kind})`, 'encryption');
  }
  if ((h.incompatibleFeatures & INCOMPAT_COMPRESSION) !== 0n && h.compressionType === COMPRESSION_DEFLATE) {
    throw corruptAt(path, 'the compression type feature bit is set but compression_type is 0 (deflate)', 'compression_type');
  }
  if ((h.incompatibleFeatures & INCOMPAT_COMPRESSION) === 0n && h.compressionType !== COMPRESSION_DEFLATE) {
    throw corruptAt(path, `compression_type ${h.compressionType} without the compression type feature bit`, 'compression_type');
  }
  assertCompressionSupported(path, h.compressionType);
  if (h.incompatibleFeatures & INCOMPAT_EXTL2 && h.clusterBits < 14) {
    throw corruptAt(path, `extended L2 entries need clusters of at least 16 KiB (cluster_bits ${h.clusterBits})`, 'cluster_bits');
  }
}

/** Checks table offsets and sizes against the file before anything is allocated or read. */
export function assertLayout(path: string, h: Qcow2Header, fileSize: number): void {
  const cs = h.clusterSize;
  const coverage = (h.l2Entries * cs);
  const needed = Math.ceil(h.size / coverage);
  if (h.l1Size * 8 > MAX_L1_BYTES) {
    throw corruptAt(path, `l1_size ${h.l1Size} is larger than the ${MAX_L1_BYTES / 8} entries QEMU allows`, 'l1_size');
  }
  if (h.l1Size < needed) {
    throw corruptAt(path, `l1_size ${h.l1Size} is too small for the virtual size ${h.size} (needs ${needed} entries)`, 'l1_size');
  }
  if (h.l1Size > 0) {
    if (h.l1TableOffset % cs !== 0) throw corruptAt(path, `l1_table_offset ${hex(h.l1TableOffset)} is not cluster-aligned`, 'l1_table_offset');
    if (h.l1TableOffset + h.l1Size * 8 > fileSize) {
      throw corruptAt(path, `L1 table at ${hex(h.l1TableOffset)} (${h.l1Size} entries) is past the end of the file (size ${hex(fileSize)})`, 'l1_table_offset');
    }
  }
  if (h.refcountTableOffset % cs !== 0) throw corruptAt(path, `refcount_table_offset ${hex(h.refcountTableOffset)} is not cluster-aligned`, 'refcount_table_offset');
  const rtBytes = h.refcountTableClusters * cs;
  if (rtBytes > MAX_REFTABLE_BYTES) {
    throw corruptAt(path, `refcount table of ${h.refcountTableClusters} clusters is larger than the ${MAX_REFTABLE_BYTES} bytes QEMU allows`, 'refcount_table_clusters');
  }
  if (h.refcountTableOffset + rtBytes > fileSize) {
    throw corruptAt(path, `refcount table at ${hex(h.refcountTableOffset)} (${h.refcountTableClusters} clusters) is past the end of the file (size ${hex(fileSize)})`, 'refcount_table_offset');
  }
  if (h.nbSnapshots > MAX_SNAPSHOTS) throw corruptAt(path, `nb_snapshots ${h.nbSnapshots} is more than ${MAX_SNAPSHOTS}`, 'nb_snapshots');
  if (h.nbSnapshots > 0 && (h.snapshotsOffset % cs !== 0 || h.snapshotsOffset >= fileSize)) {
    throw corruptAt(path, `snapshots_offset ${hex(h.snapshotsOffset)} is not cluster-aligned or past the end of the file`, 'snapshots_offset');
  }
}

/** Reads cluster 0 (or the whole file when shorter) and parses the header, naming the file in errors. */
export async function readQcow2Header(file: ImageFile, path: string, fileSize: number): Promise<Qcow2Header> {
  const first = Buffer.alloc(Math.min(512, fileSize));
  await file.read(first, 0);
  const cs = Qcow2Header.peekClusterSize(first) ?? 512;
  const c0 = cs > first.length ? Buffer.alloc(Math.min(cs, fileSize)) : first;
  if (c0 !== first) await file.read(c0, 0);
  try {
    return Qcow2Header.parse(c0);
  } catch (e) {
    if (e instanceof DiskError) throw new DiskError(e.code, e.message.replace(/^Cannot parse qcow2 header:/, `Cannot open ${path}: invalid qcow2 header:`), e.data);
    throw e;
  }
}

/** Reads and decodes the L1 table into native words. */
export async function readL1(file: ImageFile, h: Qcow2Header): Promise<Uint32Array> {
  const bytes = Buffer.alloc(h.l1Size * 8);
  if (bytes.length > 0) await file.read(bytes, h.l1TableOffset);
  const words = new Uint32Array(h.l1Size * 2);
  for (let i = 0; i < words.length; i++) words[i] = bytes.readUInt32BE(i * 4);
  return words;
}

/**
 * Opens the parsed image state: header, checks, L1, backing file. Shared by the read-only and the
 * read-write tables; the caller owns `file` until this resolves (it is not closed on failure).
 */
export async function openQcow2State(file: ImageFile, opts: Qcow2OpenOptions): Promise<Qcow2State> {
  const fileSize = await file.size();
  const h = await readQcow2Header(file, opts.path, fileSize);
  assertReadable(opts.path, h);
  assertLayout(opts.path, h, fileSize);
  const l1 = await readL1(file, h);
  const state = new Qcow2State({ path: opts.path, file, header: h, l1, fileSize, l2CacheBytes: opts.l2CacheBytes ?? DEFAULT_L2_CACHE_BYTES });
  if (h.backingFile !== undefined) {
    if (!opts.openBacking) throw new DiskError('E_BACKING', `Cannot open ${opts.path}: it has a backing file (${h.backingFile}) and no way to open it was given`);
    const fmt = h.backingFormat;
    if (fmt !== undefined && fmt !== 'raw' && fmt !== 'qcow' && fmt !== 'qcow2') {
      throw new DiskError('E_BACKING', `Cannot open ${opts.path}: backing file format "${fmt}" is not supported (raw, qcow, qcow2)`);
    }
    state.backing = await opts.openBacking(h.backingFile, fmt);
  }
  return state;
}

function readOnly(disk: DiskHandle): Promise<never> {
  return Promise.reject(new DiskError('E_DISK_READONLY', `Cannot write ${disk.path}: the image is open read-only`));
}

/** The read-only qcow2 ops table. */
export const qcow2ReadOnlyOps: DiskImageOps<Qcow2State> = {
  name: 'qcow2-ro',
  readSector(disk, sector, buf) {
    const s = disk.priv;
    const p = s.readFast(sector * 512, buf) ?? s.readAt(sector * 512, buf);
    return p.then(() => buf.length);
  },
  writeSector(disk) {
    return readOnly(disk);
  },
  flush() {
    return Promise.resolve();
  },
  async close(disk) {
    const s = disk.priv;
    try {
      if (s.backing) await s.backing.close();
    } finally {
      await s.file.close();
    }
  },
  blockStatus(disk, offset, length) {
    return disk.priv.blockStatus(offset, length);
  },
  describe(disk) {
    return disk.priv.describe();
  },
};

/** Opens a qcow2 image read-only over an open file (closing the file when opening fails). */
export async function openQcow2(file: ImageFile, opts: Qcow2OpenOptions): Promise<DiskImage<Qcow2State>> {
  let state: Qcow2State;
  try {
    state = await openQcow2State(file, opts);
  } catch (e) {
    await file.close().catch(() => undefined);
    throw e;
  }
  return new DiskImage<Qcow2State>({ path: opts.path, format: 'qcow2', size: state.size, readonly: true, ops: qcow2ReadOnlyOps, priv: state });
}
