/**
 * Codecs for the qcow2 header (versions 2 and 3, with header extensions) and the qcow version 1
 * header. Both directions live here: `parse` checks the bytes before anything is trusted, and
 * `serialize` lays the header out the way QEMU's `qcow2_update_header()` does, so a header read
 * from an image made by qemu-img serializes back to the same bytes.
 *
 * Spec: QEMU docs/interop/qcow2.rst ("Header", "Header extensions"), block/qcow.c for version 1.
 * See /work/shared/reference/qcow2.md sections 1.1-1.3 and 1.7.
 *
 * The codecs validate the *structure* (magic, version, lengths, field ranges, extensions inside
 * cluster 0). Policy (which features vblk can read, offsets against the file size) is checked at
 * open time by the format modules, so these codecs can round-trip any well-formed header.
 */
import { DiskError, hex } from '../../errors';

/** `QFI\xfb`, shared by qcow version 1 and qcow2. */
export const QCOW_MAGIC = 0x514649fb;

/** Size of the version 2 header; also where v3's feature fields start. */
export const QCOW2_V2_HEADER_SIZE = 72;
/** Minimum v3 header_length (up to refcount_order + header_length). */
export const QCOW2_V3_MIN_HEADER_SIZE = 104;
/** What QEMU 7.2 writes as header_length (includes compression_type and padding). */
export const QCOW2_V3_HEADER_SIZE = 112;
/** QEMU's limit on the backing file name length. */
export const MAX_BACKING_NAME = 1023;
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** qcow1 header size. */
export const QCOW1_HEADER_SIZE = 48;

/** Incompatible feature bits (qcow2.rst "incompatible_features"). */
export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/** Compatible feature bits. */
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
/** Autoclear feature bits. */
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;
export const AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW;

/** Header extension types. */
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

/** compression_type values. */
export const COMPRESSION_DEFLATE = 0;
export const COMPRESSION_ZSTD = 1;

/** One entry of the feature name table extension. */
export interface FeatureName {
  /** 0 incompatible, 1 compatible, 2 autoclear. */
  readonly type: number;
  readonly bit: number;
  readonly name: string;
}

/** The feature name table QEMU 7.2 writes (8 entries, 384 bytes). */
export const QEMU_FEATURE_TABLE: readonly FeatureName[] = [
  { type: 0, bit: 0, name: 'dirty bit' },
  { type: 0, bit: 1, name: 'corrupt bit' },
  { type: 0, bit: 2, name: 'external data file' },
  { type: 0, bit: 3, name: 'compression type' },
  { type: 0, bit: 4, name: 'extended L2 entries' },
  { type: 1, bit: 0, name: 'lazy refcounts' },
  { type: 2, bit: 0, name: 'bitmaps' },
  { type: 2, bit: 1, name: 'raw external data' },
];

/** Bitmaps extension payload. */
export interface BitmapsExtension {
  readonly nbBitmaps: number;
  readonly directorySize: number;
  readonly directoryOffset: number;
}

/** Full disk encryption (LUKS) header pointer. */
export interface CryptoExtension {
  readonly offset: number;
  readonly length: number;
}

/** An extension vblk does not interpret; kept so a header rewrite preserves it. */
export interface RawExtension {
  readonly type: number;
  readonly data: Uint8Array;
}

/** Fields of a qcow2 header; every optional extension is `undefined` when absent. */
export interface Qcow2HeaderFields {
  version: 2 | 3;
  clusterBits: number;
  /** Virtual size in bytes. */
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  /** refcount_bits = 1 << refcountOrder (v2: always 4). */
  refcountOrder: number;
  /** v2: 72. v3: header_length from the header (QEMU writes 112). */
  headerLength: number;
  compressionType: number;
  /** Bytes between offset 112 and header_length (unknown newer fields), kept verbatim. */
  extraHeader: Uint8Array;
  backingFile: string | undefined;
  backingFormat: string | undefined;
  dataFile: string | undefined;
  featureTable: FeatureName[] | undefined;
  bitmaps: BitmapsExtension | undefined;
  crypto: CryptoExtension | undefined;
  unknownExtensions: RawExtension[];
  /** Where the backing file name was found (0 when none). Recomputed by `serialize`. */
  backingFileOffset: number;
}

function asBuffer(buf: Uint8Array): Buffer {
  return Buffer.isBuffer(buf) ? buf : Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
}

function corrupt(what: string, msg: string, data: Record<string, unknown> = {}): DiskError {
  return new DiskError('E_QCOW_CORRUPT', `Cannot parse ${what} header: ${msg}`, data);
}

/** Reads a u64 field as bigint and returns it as a number, or throws naming the field. */
function u64(b: Buffer, off: number, field: string, what: string): number {
  const v = b.readBigUInt64BE(off);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new DiskError(field === 'size' ? 'E_QCOW_UNSUPPORTED' : 'E_QCOW_CORRUPT', `Cannot parse ${what} header: ${field} ${hex(v)} is not a safe integer`, { field });
  }
  return Number(v);
}

const pad8 = (n: number): number => (n + 7) & ~7;

function decodeName(bytes: Uint8Array): string {
  // Names are not NUL-terminated on disk, but the feature table pads with NULs.
  const end = bytes.indexOf(0);
  return Buffer.from(bytes.subarray(0, end < 0 ? bytes.length : end)).toString('utf8');
}

/**
 * The qcow2 header codec.
 *
 * @example
 *   const first = await readCluster0(file);          // at least min(cluster size, file size) bytes
 *   const h = Qcow2Header.parse(first);
 *   h.backingFile = 'base.qcow2';
 *   await file.write(h.serialize(), 0);
 */
export class Qcow2Header implements Qcow2HeaderFields {
  version: 2 | 3 = 3;
  clusterBits = 16;
  size = 0;
  cryptMethod = 0;
  l1Size = 0;
  l1TableOffset = 0;
  refcountTableOffset = 0;
  refcountTableClusters = 0;
  nbSnapshots = 0;
  snapshotsOffset = 0;
  incompatibleFeatures = 0n;
  compatibleFeatures = 0n;
  autoclearFeatures = 0n;
  refcountOrder = 4;
  headerLength = QCOW2_V3_HEADER_SIZE;
  compressionType = COMPRESSION_DEFLATE;
  extraHeader: Uint8Array = new Uint8Array(0);
  backingFile: string | undefined = undefined;
  backingFormat: string | undefined = undefined;
  dataFile: string | undefined = undefined;
  featureTable: FeatureName[] | undefined = undefined;
  bitmaps: BitmapsExtension | undefined = undefined;
  crypto: CryptoExtension | undefined = undefined;
  unknownExtensions: RawExtension[] = [];
  backingFileOffset = 0;

  constructor(init: Partial<Qcow2HeaderFields> = {}) {
    Object.assign(this, init);
    if (init.version === 2 && init.headerLength === undefined) this.headerLength = QCOW2_V2_HEADER_SIZE;
  }

  get clusterSize(): number {
    return 2 ** this.clusterBits;
  }

  get refcountBits(): number {
    return 2 ** this.refcountOrder;
  }

  /** L2 entries per L2 table (standard 8-byte entries; 16-byte with extended L2). */
  get l2Entries(): number {
    return this.clusterSize / (this.incompatibleFeatures & INCOMPAT_EXTL2 ? 16 : 8);
  }

  /**
   * Reads the cluster size from the first bytes of a file without validating anything else, so
   * a caller knows how much of cluster 0 to read before calling `parse`. Returns undefined when
   * the bytes are too short or cluster_bits is out of range (parse will report why).
   */
  static peekClusterSize(first: Uint8Array): number | undefined {
    if (first.length < 24) return undefined;
    const cb = asBuffer(first).readUInt32BE(20);
    return cb >= MIN_CLUSTER_BITS && cb <= MAX_CLUSTER_BITS ? 2 ** cb : undefined;
  }

  /**
   * Parses a qcow2 header. `cluster0` holds the first cluster of the file, or the whole file if
   * that is shorter; extensions and the backing name must lie inside it.
   *
   * @throws DiskError E_FORMAT_UNKNOWN (bad magic), E_QCOW_UNSUPPORTED (unknown version, size not
   *   a safe integer), E_QCOW_CORRUPT (truncated, fields out of range, malformed extensions).
   */
  static parse(cluster0: Uint8Array): Qcow2Header {
    const b = asBuffer(cluster0);
    const what = 'qcow2';
    if (b.length < 8) throw corrupt(what, `file is ${b.length} bytes, too short for the magic and version`);
    if (b.readUInt32BE(0) !== QCOW_MAGIC) throw new DiskError('E_FORMAT_UNKNOWN', `Cannot parse qcow2 header: bad magic ${hex(b.readUInt32BE(0))}`);
    const version = b.readUInt32BE(4);
    if (version !== 2 && version !== 3) {
      throw new DiskError('E_QCOW_UNSUPPORTED', `Cannot parse qcow2 header: unsupported qcow version ${version}`, { version });
    }
    if (b.length < QCOW2_V2_HEADER_SIZE) throw corrupt(what, `truncated: ${b.length} bytes, the version ${version} header needs ${version === 2 ? 72 : 104}`);
    const h = new Qcow2Header({ version });
    h.backingFileOffset = u64(b, 8, 'backing_file_offset', what);
    const backingSize = b.readUInt32BE(16);
    h.clusterBits = b.readUInt32BE(20);
    if (h.clusterBits < MIN_CLUSTER_BITS || h.clusterBits > MAX_CLUSTER_BITS) {
      throw corrupt(what, `cluster_bits ${h.clusterBits} is outside ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS}`, { field: 'cluster_bits' });
    }
    h.size = u64(b, 24, 'size', what);
    h.cryptMethod = b.readUInt32BE(32);
    h.l1Size = b.readUInt32BE(36);
    h.l1TableOffset = u64(b, 40, 'l1_table_offset', what);
    h.refcountTableOffset = u64(b, 48, 'refcount_table_offset', what);
    h.refcountTableClusters = b.readUInt32BE(56);
    h.nbSnapshots = b.readUInt32BE(60);
    h.snapshotsOffset = u64(b, 64, 'snapshots_offset', what);
    if (version === 2) {
      h.headerLength = QCOW2_V2_HEADER_SIZE;
      h.refcountOrder = 4;
    } else {
      if (b.length < QCOW2_V3_MIN_HEADER_SIZE) throw corrupt(what, `truncated: ${b.length} bytes, the version 3 header needs ${QCOW2_V3_MIN_HEADER_SIZE}`);
      h.incompatibleFeatures = b.readBigUInt64BE(72);
      h.compatibleFeatures = b.readBigUInt64BE(80);
      h.autoclearFeatures = b.readBigUInt64BE(88);
      h.refcountOrder = b.readUInt32BE(96);
      h.headerLength = b.readUInt32BE(100);
      if (h.refcountOrder > 6) throw corrupt(what, `refcount_order ${h.refcountOrder} is greater than 6`, { field: 'refcount_order' });
      if (h.headerLength < QCOW2_V3_MIN_HEADER_SIZE || h.headerLength % 8 !== 0) {
        throw corrupt(what, `header_length ${h.headerLength} must be at least ${QCOW2_V3_MIN_HEADER_SIZE} and a multiple of 8`, { field: 'header_length' });
      }
      if (h.headerLength > h.clusterSize) throw corrupt(what, `header_length ${h.headerLength} is larger than a cluster (${h.clusterSize})`, { field: 'header_length' });
      if (b.length < h.headerLength) throw corrupt(what, `truncated: ${b.length} bytes, header_length is ${h.headerLength}`);
      h.compressionType = h.headerLength > 104 ? b.readUInt8(104) : COMPRESSION_DEFLATE;
      h.extraHeader = h.headerLength > QCOW2_V3_HEADER_SIZE ? Uint8Array.from(b.subarray(QCOW2_V3_HEADER_SIZE, h.headerLength)) : new Uint8Array(0);
    }
    // As QEMU: extensions end at the backing file name if there is one, else at the end of cluster 0.
    const end = h.backingFileOffset !== 0 ? Math.min(h.backingFileOffset, h.clusterSize) : h.clusterSize;
    Qcow2Header.#parseExtensions(h, b, end);
    if (h.backingFileOffset !== 0) {
      if (backingSize > MAX_BACKING_NAME) throw corrupt(what, `backing_file_size ${backingSize} is larger than ${MAX_BACKING_NAME}`, { field: 'backing_file_size' });
      if (h.backingFileOffset + backingSize > h.clusterSize) {
        throw corrupt(what, `backing file name at ${hex(h.backingFileOffset)}+${backingSize} is not inside cluster 0`, { field: 'backing_file_offset' });
      }
      if (h.backingFileOffset + backingSize > b.length) throw corrupt(what, `backing file name at ${hex(h.backingFileOffset)}+${backingSize} is past the end of the file`);
      // An empty name means no backing file: QEMU (bdrv_open_backing_file) skips it too.
      if (backingSize > 0) h.backingFile = b.subarray(h.backingFileOffset, h.backingFileOffset + backingSize).toString('utf8');
    }
    return h;
  }

  static #parseExtensions(h: Qcow2Header, b: Buffer, end: number): void {
    const what = 'qcow2';
    let off = h.headerLength;
    for (let n = 0; off < end; n++) {
      // Bytes past the end of a short file read as zeroes, i.e. as the end marker.
      if (off + 8 > b.length && b.subarray(off).every((x) => x === 0)) return;
      if (off + 8 > end || off + 8 > b.length) throw corrupt(what, `header extension at ${hex(off)} is cut off (extensions must end by ${hex(end)})`);
      const type = b.readUInt32BE(off);
      const len = b.readUInt32BE(off + 4);
      if (type === EXT_END) return;
      const start = off + 8;
      if (len > end - start || len > b.length - start) {
        throw corrupt(what, `header extension ${hex(type)} at ${hex(off)} has length ${len}, past ${hex(Math.min(end, b.length))}`, { ext: type });
      }
      const data = b.subarray(start, start + len);
      switch (type) {
        case EXT_BACKING_FORMAT:
          h.backingFormat = data.toString('utf8');
          break;
        case EXT_DATA_FILE:
          h.dataFile = data.toString('utf8');
          break;
        case EXT_FEATURE_TABLE: {
          if (len % 48 !== 0) throw corrupt(what, `feature name table length ${len} is not a multiple of 48`);
          const table: FeatureName[] = [];
          for (let i = 0; i < len; i += 48) {
            table.push({ type: data.readUInt8(i), bit: data.readUInt8(i + 1), name: decodeName(data.subarray(i + 2, i + 48)) });
          }
          h.featureTable = table;
          break;
        }
        case EXT_BITMAPS: {
          if (len < 24) throw corrupt(what, `bitmaps extension length ${len} is shorter than 24`);
          h.bitmaps = {
            nbBitmaps: data.readUInt32BE(0),
            directorySize: u64(data, 8, 'bitmap_directory_size', what),
            directoryOffset: u64(data, 16, 'bitmap_directory_offset', what),
          };
          break;
        }
        case EXT_CRYPTO: {
          if (len < 16) throw corrupt(what, `encryption header extension length ${len} is shorter than 16`);
          h.crypto = { offset: u64(data, 0, 'crypto header offset', what), length: u64(data, 8, 'crypto header length', what) };
          break;
        }
        default:
          h.unknownExtensions.push({ type, data: Uint8Array.from(data) });
      }
      off = start + pad8(len);
      if (n > 1024) throw corrupt(what, 'more than 1024 header extensions');
    }
  }

  /** Serialized extensions in QEMU's order (backing format, data file, crypto, features, bitmaps, unknown). */
  #extensions(): RawExtension[] {
    const out: RawExtension[] = [];
    if (this.backingFormat !== undefined) out.push({ type: EXT_BACKING_FORMAT, data: Buffer.from(this.backingFormat, 'utf8') });
    if (this.dataFile !== undefined) out.push({ type: EXT_DATA_FILE, data: Buffer.from(this.dataFile, 'utf8') });
    if (this.crypto) {
      const d = Buffer.alloc(16);
      d.writeBigUInt64BE(BigInt(this.crypto.offset), 0);
      d.writeBigUInt64BE(BigInt(this.crypto.length), 8);
      out.push({ type: EXT_CRYPTO, data: d });
    }
    if (this.featureTable) {
      const d = Buffer.alloc(48 * this.featureTable.length);
      this.featureTable.forEach((f, i) => {
        d.writeUInt8(f.type, i * 48);
        d.writeUInt8(f.bit, i * 48 + 1);
        const name = Buffer.from(f.name, 'utf8');
        if (name.length > 46) throw new RangeError(`feature name "${f.name}" is longer than 46 bytes`);
        name.copy(d, i * 48 + 2);
      });
      out.push({ type: EXT_FEATURE_TABLE, data: d });
    }
    if (this.bitmaps) {
      const d = Buffer.alloc(24);
      d.writeUInt32BE(this.bitmaps.nbBitmaps, 0);
      d.writeBigUInt64BE(BigInt(this.bitmaps.directorySize), 8);
      d.writeBigUInt64BE(BigInt(this.bitmaps.directoryOffset), 16);
      out.push({ type: EXT_BITMAPS, data: d });
    }
    out.push(...this.unknownExtensions);
    return out;
  }

  /**
   * Serializes the header, its extensions, the end marker and the backing file name (placed right
   * after the end marker, as QEMU does; `backingFileOffset` is updated to match). The result must
   * fit in cluster 0.
   *
   * @throws RangeError when a field is out of range or the result does not fit in one cluster.
   */
  serialize(): Buffer {
    if (this.version !== 2 && this.version !== 3) throw new RangeError(`qcow2 version must be 2 or 3, got ${String(this.version)}`);
    const hlen = this.version === 2 ? QCOW2_V2_HEADER_SIZE : this.headerLength;
    if (this.version === 3 && (hlen < QCOW2_V3_MIN_HEADER_SIZE || hlen % 8 !== 0)) throw new RangeError(`header_length ${hlen} is invalid`);
    if (this.version === 3 && hlen > QCOW2_V3_HEADER_SIZE && this.extraHeader.length !== hlen - QCOW2_V3_HEADER_SIZE) {
      throw new RangeError(`extraHeader is ${this.extraHeader.length} bytes, header_length ${hlen} needs ${hlen - QCOW2_V3_HEADER_SIZE}`);
    }
    const exts = this.#extensions();
    const name = this.backingFile ? Buffer.from(this.backingFile, 'utf8') : undefined; // '' = none, as parse reads it
    if (name && name.length > MAX_BACKING_NAME) throw new RangeError(`backing file name is ${name.length} bytes, the limit is ${MAX_BACKING_NAME}`);
    let total = hlen;
    for (const e of exts) total += 8 + pad8(e.data.length);
    total += 8; // end marker
    const nameOffset = total;
    if (name) total += name.length;
    if (total > this.clusterSize) throw new RangeError(`header needs ${total} bytes, more than one cluster (${this.clusterSize})`);
    const b = Buffer.alloc(total);
    b.writeUInt32BE(QCOW_MAGIC, 0);
    b.writeUInt32BE(this.version, 4);
    this.backingFileOffset = name ? nameOffset : 0;
    b.writeBigUInt64BE(BigInt(this.backingFileOffset), 8);
    b.writeUInt32BE(name ? name.length : 0, 16);
    b.writeUInt32BE(this.clusterBits, 20);
    b.writeBigUInt64BE(BigInt(this.size), 24);
    b.writeUInt32BE(this.cryptMethod, 32);
    b.writeUInt32BE(this.l1Size, 36);
    b.writeBigUInt64BE(BigInt(this.l1TableOffset), 40);
    b.writeBigUInt64BE(BigInt(this.refcountTableOffset), 48);
    b.writeUInt32BE(this.refcountTableClusters, 56);
    b.writeUInt32BE(this.nbSnapshots, 60);
    b.writeBigUInt64BE(BigInt(this.snapshotsOffset), 64);
    if (this.version === 3) {
      b.writeBigUInt64BE(BigInt.asUintN(64, this.incompatibleFeatures), 72);
      b.writeBigUInt64BE(BigInt.asUintN(64, this.compatibleFeatures), 80);
      b.writeBigUInt64BE(BigInt.asUintN(64, this.autoclearFeatures), 88);
      b.writeUInt32BE(this.refcountOrder, 96);
      b.writeUInt32BE(hlen, 100);
      if (hlen > 104) b.writeUInt8(this.compressionType, 104);
      if (hlen > QCOW2_V3_HEADER_SIZE) b.set(this.extraHeader, QCOW2_V3_HEADER_SIZE);
    }
    let off = hlen;
    for (const e of exts) {
      b.writeUInt32BE(e.type, off);
      b.writeUInt32BE(e.data.length, off + 4);
      b.set(e.data, off + 8);
      off += 8 + pad8(e.data.length);
    }
    off += 8; // end marker (already zero)
    if (name) name.copy(b, off);
    return b;
  }
}

/** Fields of a qcow version 1 header. */
export interface QcowHeaderFields {
  backingFile: string | undefined;
  backingFileOffset: number;
  mtime: number;
  size: number;
  clusterBits: number;
  l2Bits: number;
  cryptMethod: number;
  l1TableOffset: number;
}

/**
 * The qcow version 1 header codec (48 bytes, block/qcow.c `QCowHeader`), followed by the backing
 * file name. `serialize` places the name right after the header, as QEMU does.
 */
export class QcowHeader implements QcowHeaderFields {
  backingFile: string | undefined = undefined;
  backingFileOffset = 0;
  mtime = 0;
  size = 0;
  clusterBits = 12;
  l2Bits = 9;
  cryptMethod = 0;
  l1TableOffset = 0;

  constructor(init: Partial<QcowHeaderFields> = {}) {
    Object.assign(this, init);
  }

  get clusterSize(): number {
    return 2 ** this.clusterBits;
  }

  /** Number of L1 entries needed for the virtual size (rounds up, as QEMU does). */
  get l1Size(): number {
    const shift = this.clusterBits + this.l2Bits;
    return Math.ceil(this.size / 2 ** shift);
  }

  /**
   * Parses a qcow1 header from the first bytes of the file (at least 48). The backing file name
   * is taken from `backingName` when given (read separately: QEMU reads it wherever
   * backing_file_offset points), else from `first`.
   *
   * @throws DiskError E_FORMAT_UNKNOWN (bad magic), E_QCOW_UNSUPPORTED (version, size),
   *   E_QCOW_CORRUPT (truncated, cluster_bits/l2_bits out of range, name outside the buffer).
   */
  static parse(first: Uint8Array, backingName?: Uint8Array): QcowHeader {
    const b = asBuffer(first);
    const what = 'qcow';
    if (b.length < 8) throw corrupt(what, `file is ${b.length} bytes, too short for the magic and version`);
    if (b.readUInt32BE(0) !== QCOW_MAGIC) throw new DiskError('E_FORMAT_UNKNOWN', `Cannot parse qcow header: bad magic ${hex(b.readUInt32BE(0))}`);
    const version = b.readUInt32BE(4);
    if (version !== 1) throw new DiskError('E_QCOW_UNSUPPORTED', `Cannot parse qcow header: version ${version} is not 1`, { version });
    if (b.length < QCOW1_HEADER_SIZE) throw corrupt(what, `truncated: ${b.length} bytes, the header needs ${QCOW1_HEADER_SIZE}`);
    const h = new QcowHeader();
    h.backingFileOffset = u64(b, 8, 'backing_file_offset', what);
    const nameLen = b.readUInt32BE(16);
    h.mtime = b.readUInt32BE(20);
    h.size = u64(b, 24, 'size', what);
    h.clusterBits = b.readUInt8(32);
    h.l2Bits = b.readUInt8(33);
    h.cryptMethod = b.readUInt32BE(36);
    h.l1TableOffset = u64(b, 40, 'l1_table_offset', what);
    // QEMU (block/qcow.c): cluster_bits 9..16, l2_bits 6..13.
    if (h.clusterBits < 9 || h.clusterBits > 16) throw corrupt(what, `cluster_bits ${h.clusterBits} is outside 9..16`, { field: 'cluster_bits' });
    if (h.l2Bits < 6 || h.l2Bits > 13) throw corrupt(what, `l2_bits ${h.l2Bits} is outside 6..13`, { field: 'l2_bits' });
    if (h.backingFileOffset !== 0) {
      if (nameLen > MAX_BACKING_NAME) throw corrupt(what, `backing_file_size ${nameLen} is larger than ${MAX_BACKING_NAME}`, { field: 'backing_file_size' });
      let name = backingName;
      if (name === undefined) {
        if (h.backingFileOffset + nameLen > b.length) throw corrupt(what, `backing file name at ${hex(h.backingFileOffset)}+${nameLen} is past the end of the header buffer`);
        name = b.subarray(h.backingFileOffset, h.backingFileOffset + nameLen);
      } else if (name.length !== nameLen) {
        throw corrupt(what, `backing file name at ${hex(h.backingFileOffset)} is ${name.length} bytes, backing_file_size says ${nameLen}`, { field: 'backing_file_size' });
      }
      // An empty name means no backing file, as for qcow2 (QEMU opens such an image standalone).
      if (nameLen > 0) h.backingFile = Buffer.from(name.buffer, name.byteOffset, name.byteLength).toString('utf8');
    }
    return h;
  }

  /** Serializes the 48-byte header followed by the backing file name (backingFileOffset = 48). */
  serialize(): Buffer {
    const name = this.backingFile ? Buffer.from(this.backingFile, 'utf8') : undefined; // '' = none, as parse reads it
    if (name && name.length > MAX_BACKING_NAME) throw new RangeError(`backing file name is ${name.length} bytes, the limit is ${MAX_BACKING_NAME}`);
    const b = Buffer.alloc(QCOW1_HEADER_SIZE + (name ? name.length : 0));
    b.writeUInt32BE(QCOW_MAGIC, 0);
    b.writeUInt32BE(1, 4);
    this.backingFileOffset = name ? QCOW1_HEADER_SIZE : 0;
    b.writeBigUInt64BE(BigInt(this.backingFileOffset), 8);
    b.writeUInt32BE(name ? name.length : 0, 16);
    b.writeUInt32BE(this.mtime, 20);
    b.writeBigUInt64BE(BigInt(this.size), 24);
    b.writeUInt8(this.clusterBits, 32);
    b.writeUInt8(this.l2Bits, 33);
    b.writeUInt32BE(this.cryptMethod, 36);
    b.writeBigUInt64BE(BigInt(this.l1TableOffset), 40);
    if (name) name.copy(b, QCOW1_HEADER_SIZE);
    return b;
  }
}
