/**
 * qcow version 1: the per-image state and the read-only ops table.
 *
 * Spec: QEMU block/qcow.c; reference/qcow2.md section 1.7. Differences from qcow2 that matter
 * here: L1 size rounds UP (kvmtool truncates it and loses the end of the disk), L2 tables are
 * 2^l2_bits entries (not one cluster), entries are plain offsets, and a compressed entry (bit 63)
 * stores its length in bytes: `csize = (e >> (63 - cb)) & (cluster_size - 1)`.
 */
import { DiskError, hex } from '../../errors';
import { DiskImage } from '../disk-image';
import type { ImageFile } from '../file';
import type { BlockStatus, DiskImageOps, ImageDescription, ImageFormat } from '../types';
import { MAX_BACKING_NAME, QCOW_MAGIC, QcowHeader, QCOW1_HEADER_SIZE } from './header';
import { L2Cache, L2Table } from './l2-cache';
import { inflateCluster } from './compress';
import { readBytesAt, backingStatus, closingOnFailure, layeredReadOnlyOps, type ByteReader } from './chain';
import { combinePath, MAX_L1_BYTES, DEFAULT_L2_CACHE_BYTES } from './qcow2';
import { QCOW_HI_COMPRESSED, qcowCompressed, qcowOffset } from './entry';


const enum Kind {
  Unallocated = 0,
  Data = 2,
  Compressed = 3,
}

/** Options of `openQcow1`. */
export interface QcowOpenOptions {
  readonly path: string;
  readonly l2CacheBytes?: number;
  /** Opens the backing file (name from the header, format from the extension); undefined = do not open. */
  readonly openBacking?: (name: string, format: ImageFormat | undefined) => Promise<DiskImage | undefined>;
}

/** State of an open qcow version 1 image (`DiskImage.priv`). */
export class QcowState implements ByteReader {
  readonly path: string;
  readonly file: ImageFile;
  readonly header: QcowHeader;
  readonly clusterBits: number;
  readonly clusterSize: number;
  readonly l2Entries: number;
  readonly size: number;
  /** L1 decoded to native words (hi, lo) per entry. */
  l1: Uint32Array;
  readonly l1Size: number;
  readonly l2Cache: L2Cache;
  backing: DiskImage | undefined = undefined;
  fileSize: number;
  #inflated: { host: number; data: Promise<Buffer> } | undefined;
  #kind: Kind = Kind.Unallocated;
  #host = 0;
  #run = 0;
  #csize = 0;

  constructor(init: { path: string; file: ImageFile; header: QcowHeader; l1: Uint32Array; fileSize: number; l2CacheBytes: number }) {
    const h = init.header;
    this.path = init.path;
    this.file = init.file;
    this.header = h;
    this.clusterBits = h.clusterBits;
    this.clusterSize = h.clusterSize;
    this.l2Entries = 2 ** h.l2Bits;
    this.size = h.size;
    this.l1 = init.l1;
    this.l1Size = h.l1Size;
    this.fileSize = init.fileSize;
    const tableBytes = this.l2Entries * 8;
    this.l2Cache = new L2Cache({
      capacity: Math.max(4, Math.min(65536, Math.floor(init.l2CacheBytes / tableBytes))),
      tableBytes,
      read: (buf, off) => this.file.read(buf, off),
    });
  }

  get l2Coverage(): number {
    return this.l2Entries * this.clusterSize;
  }

  /** L2 table offset of L1 entry `i` (0 = unallocated), checked against the file. */
  l2Offset(i: number): number {
    const off = this.rawL2Offset(i);
    if (off === 0) return 0;
    const problem = this.l2OffsetProblem(i, off);
    if (problem !== undefined) throw new DiskError('E_QCOW_CORRUPT', `Cannot read ${this.path}: ${problem}`, { l1Index: i });
    return off;
  }

  /** L2 table offset of L1 entry `i` as it is on disk (0 = unallocated), not validated. */
  rawL2Offset(i: number): number {
    return qcowOffset(this.l1[2 * i] ?? 0, this.l1[2 * i + 1] ?? 0);
  }

  /**
   * Why the L2 table offset of L1 entry `i` cannot be used, naming the entry, or undefined when
   * it can (or the entry is unallocated): the table must lie inside the file. Reads and writes
   * both ask here.
   * (`off` is the entry's raw offset, passed by callers that have it already.)
   */
  l2OffsetProblem(i: number, off = this.rawL2Offset(i)): string | undefined {
    if (off === 0) return undefined;
    // Past 2^53 the offset is not a safe integer, so it is past any real file as well.
    if (!Number.isSafeInteger(off) || off + this.l2Entries * 8 > this.fileSize) {
      return `L1 entry ${i} points to L2 table ${hex(off)} past the end of the file (size ${hex(this.fileSize)})`;
    }
    return undefined;
  }

  #classify(cur: number, table: L2Table | null, l1i: number): void {
    const cs = this.clusterSize;
    if (table === null) {
      this.#kind = Kind.Unallocated;
      this.#run = (l1i + 1) * this.l2Coverage - cur;
      return;
    }
    const ci = Math.floor(cur / cs);
    const l2i = ci - l1i * this.l2Entries;
    const inCluster = cur - ci * cs;
    this.#run = cs - inCluster;
    const hi = table.words[2 * l2i] ?? 0;
    const lo = table.words[2 * l2i + 1] ?? 0;
    if (hi & QCOW_HI_COMPRESSED) {
      const c = qcowCompressed(hi, lo, this.clusterBits);
      const problem = this.compressedProblem(c.host);
      if (problem !== undefined) {
        throw new DiskError('E_QCOW_CORRUPT', `Cannot read ${this.path}: L2 entry ${l2i} of table ${hex(table.offset)} ${problem}`, { l2Index: l2i });
      }
      this.#kind = Kind.Compressed;
      this.#csize = c.csize;
      this.#host = c.host;
      return;
    }
    const host = qcowOffset(hi, lo);
    if (host === 0) {
      this.#kind = Kind.Unallocated;
      return;
    }
    const problem = this.dataClusterProblem(host);
    if (problem !== undefined) {
      throw new DiskError('E_QCOW_CORRUPT', `Cannot read ${this.path}: L2 entry ${l2i} of table ${hex(table.offset)} (${hex(table.entry(l2i))}) ${problem}`, { l2Index: l2i });
    }
    this.#kind = Kind.Data;
    this.#host = host + inCluster;
  }

  /**
   * Why the data cluster offset `host` read from an L2 entry cannot be used, or undefined when
   * it can: cluster-aligned and starting inside the file. Reads and writes both ask here.
   */
  dataClusterProblem(host: number): string | undefined {
    if (host % this.clusterSize !== 0) return `has data offset ${hex(host)}, not cluster-aligned`;
    // Past 2^53 the offset is not a safe integer, so it is past any real file as well.
    if (!Number.isSafeInteger(host) || host >= this.fileSize) return `points to cluster ${hex(host)} past the end of the file (size ${hex(this.fileSize)})`;
    return undefined;
  }

  /**
   * Why the compressed stream offset `host` read from an L2 entry cannot be used, or undefined
   * when it can (it starts inside the file). Reads and writes both ask here.
   */
  compressedProblem(host: number): string | undefined {
    if (host >= this.fileSize) return `points to compressed data at ${hex(host)} past the end of the file`;
    return undefined;
  }

  #table(l1i: number): L2Table | null | Promise<L2Table> {
    const off = this.l2Offset(l1i);
    if (off === 0) return null;
    return this.l2Cache.peek(off) ?? this.l2Cache.get(off);
  }

  #inflate(host: number, csize: number): Promise<Buffer> {
    if (this.#inflated && this.#inflated.host === host) return this.#inflated.data;
    const data = (async () => {
      const raw = Buffer.allocUnsafe(Math.min(csize, this.fileSize - host));
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

  async readAt(offset: number, buf: Uint8Array): Promise<void> {
    const end = Math.min(offset + buf.length, this.size);
    if (end < offset + buf.length) buf.fill(0, Math.max(0, end - offset));
    const pending: Promise<void>[] = [];
    let segKind: Kind | undefined;
    let segStart = 0;
    let segLen = 0;
    let segHost = 0;
    const flush = (): void => {
      if (segLen === 0) return;
      const sub = buf.subarray(segStart, segStart + segLen);
      if (segKind === Kind.Data) {
        pending.push(this.file.read(sub, segHost).then((n) => void (n < sub.length && sub.fill(0, n))));
      } else if (this.backing) {
        pending.push(readBytesAt(this.backing, offset + segStart, sub));
      } else {
        sub.fill(0);
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
        const sub = buf.subarray(pos, pos + n);
        pending.push(this.#inflate(this.#host, this.#csize).then((d) => sub.set(d.subarray(inCluster, inCluster + n))));
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

  async blockStatus(offset: number, length: number): Promise<BlockStatus> {
    const end = Math.min(offset + length, this.size);
    let cur = offset;
    let kind: Kind | undefined;
    let host = 0;
    let total = 0;
    while (cur < end) {
      const l1i = Math.floor(cur / this.l2Coverage);
      let t = this.#table(l1i);
      if (t instanceof Promise) t = await t;
      this.#classify(cur, t, l1i);
      const n = Math.min(this.#run, end - cur);
      const k = this.#kind;
      const h = k === Kind.Data ? this.#host : 0;
      if (kind === undefined) {
        kind = k;
        host = h;
      } else if (k !== kind || (k === Kind.Data && h !== host + total) || k === Kind.Compressed) {
        break;
      }
      total += n;
      cur += n;
      if (k === Kind.Compressed) break;
    }
    if (kind === Kind.Data) return { length: total, present: true, zero: false, data: true, depth: 0, offset: host, filename: this.path };
    if (kind === Kind.Compressed) return { length: total, present: true, zero: false, data: true, depth: 0, filename: this.path };
    if (this.backing && offset < this.backing.size) return backingStatus(this.backing, offset, Math.min(total, this.backing.size - offset), 1);
    return { length: total, present: false, zero: true, data: false, depth: 0 };
  }

  describe(): ImageDescription {
    const d: { -readonly [K in keyof ImageDescription]: ImageDescription[K] } = { format: 'qcow', virtualSize: this.size, clusterSize: this.clusterSize, dirty: false };
    if (this.header.backingFile !== undefined) {
      d.backingFile = this.header.backingFile;
      d.fullBackingFilename = combinePath(this.path, this.header.backingFile);
    }
    return d;
  }
}

/**
 * The backing file name bytes, read wherever backing_file_offset points (as QEMU does), or
 * undefined when there is none or the header is too short to say (QcowHeader.parse reports that).
 */
async function readBackingName(file: ImageFile, path: string, first: Buffer, fileSize: number): Promise<Uint8Array | undefined> {
  if (first.length < QCOW1_HEADER_SIZE || first.readUInt32BE(0) !== QCOW_MAGIC) return undefined;
  const offset = first.readBigUInt64BE(8);
  const length = first.readUInt32BE(16);
  // Oversized names are refused by parse (naming backing_file_size) before anything is read.
  if (offset === 0n || length > MAX_BACKING_NAME) return undefined;
  if (offset + BigInt(length) > BigInt(fileSize)) {
    throw new DiskError('E_QCOW_CORRUPT', `Cannot open ${path}: backing file name at ${hex(offset)}+${length} is past the end of the file (size ${hex(fileSize)})`, { field: 'backing_file_offset' });
  }
  const name = Buffer.alloc(length);
  if (length > 0) await file.read(name, Number(offset));
  return name;
}

/** Opens the qcow1 state (header checks, L1, backing); the caller closes `file` on failure. */
export async function openQcowState(file: ImageFile, opts: QcowOpenOptions): Promise<QcowState> {
  const path = opts.path;
  const fileSize = await file.size();
  const first = Buffer.alloc(Math.min(QCOW1_HEADER_SIZE, fileSize));
  await file.read(first, 0);
  let h: QcowHeader;
  try {
    h = QcowHeader.parse(first, await readBackingName(file, path, first, fileSize));
  } catch (e) {
    if (e instanceof DiskError) throw new DiskError(e.code, e.message.replace(/^Cannot parse qcow header:/, `Cannot open ${path}: invalid qcow header:`), e.data);
    throw e;
  }
  if (h.cryptMethod !== 0) {
    throw new DiskError('E_QCOW_UNSUPPORTED', `Cannot open ${path}: unsupported qcow feature: encryption (crypt_method ${h.cryptMethod}, AES)`, { feature: 'encryption' });
  }
  const l1Size = h.l1Size;
  if (l1Size * 8 > MAX_L1_BYTES) {
    throw new DiskError('E_QCOW_CORRUPT', `Cannot open ${path}: the virtual size ${h.size} needs an L1 table of ${l1Size} entries, more than ${MAX_L1_BYTES / 8}`, { field: 'size' });
  }
  if (h.l1TableOffset + l1Size * 8 > fileSize) {
    throw new DiskError('E_QCOW_CORRUPT', `Cannot open ${path}: L1 table at ${hex(h.l1TableOffset)} (${l1Size} entries) is past the end of the file (size ${hex(fileSize)})`, { field: 'l1_table_offset' });
  }
  const bytes = Buffer.alloc(l1Size * 8);
  if (bytes.length) await file.read(bytes, h.l1TableOffset);
  const l1 = new Uint32Array(l1Size * 2);
  for (let i = 0; i < l1.length; i++) l1[i] = bytes.readUInt32BE(i * 4);
  const state = new QcowState({ path, file, header: h, l1, fileSize, l2CacheBytes: opts.l2CacheBytes ?? DEFAULT_L2_CACHE_BYTES });
  if (h.backingFile !== undefined) {
    if (!opts.openBacking) throw new DiskError('E_BACKING', `Cannot open ${path}: it has a backing file (${h.backingFile}) and no way to open it was given`);
    state.backing = await opts.openBacking(h.backingFile, undefined);
  }
  return state;
}

/** The read-only qcow version 1 ops table. */
export const qcowReadOnlyOps: DiskImageOps<QcowState> = layeredReadOnlyOps<QcowState>('qcow-ro');

/** Opens a qcow version 1 image read-only (closing `file` when opening fails). */
export async function openQcow1(file: ImageFile, opts: QcowOpenOptions): Promise<DiskImage<QcowState>> {
  const state = await closingOnFailure(file, () => openQcowState(file, opts));
  return new DiskImage<QcowState>({ path: opts.path, format: 'qcow', size: state.size, readonly: true, ops: qcowReadOnlyOps, priv: state });
}
