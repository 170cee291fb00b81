/**
 * Creating images: raw, qcow2 (defaults as `qemu-img create -f qcow2`: compat 1.1, 64 KiB
 * clusters, 16-bit refcounts) and qcow version 1 (block/qcow.c `qcow_co_create`).
 *
 * qcow2 layout, as QEMU 7.2 lays it out: header (cluster 0), refcount table (cluster 1), one
 * refcount block (cluster 2), L1 table (cluster 3...), then, with preallocation=metadata, L2
 * tables and the data clusters they point at (the file is extended over them, sparse).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DiskError, hex } from '../../errors';
import type { ImageFormat } from '../types';
import { NodeImageFile } from '../file';
import type { ImageFile } from '../file';
import {
  Qcow2Header,
  QcowHeader,
  QCOW_MAGIC,
  QEMU_FEATURE_TABLE,
  COMPAT_LAZY_REFCOUNTS,
  MIN_CLUSTER_BITS,
  MAX_CLUSTER_BITS,
} from './header';
import { RefcountManager, setRefcount } from './refcount';
import { QCOW2_COPIED } from './entry';

/** Options of `createImage`, named after `qemu-img create -o`. */
export interface CreateOptions {
  readonly format: ImageFormat;
  /** Virtual size in bytes; defaults to the backing file's size. */
  readonly size?: number;
  /** qcow2: 512 B .. 2 MiB, power of two (default 64 KiB). */
  readonly clusterSize?: number;
  /** qcow2: '0.10' (version 2) or '1.1' (version 3, default). */
  readonly compat?: '0.10' | '1.1';
  /** qcow2 v3: compatible bit 0. */
  readonly lazyRefcounts?: boolean;
  /** qcow2: 1, 2, 4 ... 64 (default 16; v2 allows only 16). */
  readonly refcountBits?: number;
  /** qcow2: 'metadata' allocates every L2 table and data cluster up front. */
  readonly preallocation?: 'off' | 'metadata';
  /** Backing file name, stored as given (relative names are relative to the new image). */
  readonly backingFile?: string;
  readonly backingFormat?: ImageFormat;
  /** Replace an existing file (default false: fail if it exists). */
  readonly overwrite?: boolean;
}

function usage(file: string, msg: string): DiskError {
  return new DiskError('E_USAGE', `Cannot create ${file}: ${msg}`);
}

/** Resolves a backing name the way QEMU does: relative to the directory of the overlay. */
export function resolveBackingPath(imagePath: string, backing: string): string {
  return path.isAbsolute(backing) ? backing : path.join(path.dirname(imagePath), backing);
}

/** Virtual size and format of an existing image, read from its header (no full open). */
export async function probeSize(file: string, format?: ImageFormat): Promise<{ size: number; format: ImageFormat }> {
  const f = await NodeImageFile.open(file, { writable: false });
  try {
    const first = new Uint8Array(4096);
    const n = await f.read(first, 0);
    const isQcow = n >= 8 && Buffer.from(first.buffer, 0, 8).readUInt32BE(0) === QCOW_MAGIC;
    const version = isQcow ? Buffer.from(first.buffer, 0, 8).readUInt32BE(4) : 0;
    const fmt: ImageFormat = format ?? (isQcow ? (version === 1 ? 'qcow' : 'qcow2') : 'raw');
    if (fmt === 'raw') return { size: await f.size(), format: 'raw' };
    if (fmt === 'qcow') return { size: QcowHeader.parse(first.subarray(0, n)).size, format: 'qcow' };
    const cs = Qcow2Header.peekClusterSize(first.subarray(0, n)) ?? 4096;
    const c0 = new Uint8Array(cs);
    const m = await f.read(c0, 0);
    return { size: Qcow2Header.parse(c0.subarray(0, m)).size, format: 'qcow2' };
  } finally {
    await f.close();
  }
}

/**
 * Creates a new image.
 *
 * @example
 *   await createImage('disk.qcow2', { format: 'qcow2', size: 64 << 20, clusterSize: 4096 });
 *   await createImage('top.qcow2', { format: 'qcow2', backingFile: 'disk.qcow2', backingFormat: 'qcow2' });
 * @throws DiskError E_USAGE for invalid options, E_DISK_IO when the file cannot be written.
 */
export async function createImage(file: string, opts: CreateOptions): Promise<void> {
  let size = opts.size;
  let backingFormat = opts.backingFormat;
  if (opts.backingFile !== undefined) {
    if (opts.format === 'raw') throw usage(file, 'raw images cannot have a backing file');
    const bpath = resolveBackingPath(file, opts.backingFile);
    if (!fs.existsSync(bpath)) throw new DiskError('E_BACKING', `Cannot create ${file}: backing file ${bpath} does not exist`);
    const probed = await probeSize(bpath, backingFormat);
    backingFormat ??= probed.format;
    size ??= probed.size;
  }
  if (size === undefined) throw usage(file, 'no size given and no backing file to take it from');
  if (!Number.isSafeInteger(size) || size < 0) throw usage(file, `size ${size} is not a non-negative integer`);
  if (opts.format === 'raw') {
    for (const k of ['clusterSize', 'compat', 'lazyRefcounts', 'refcountBits'] as const) {
      if (opts[k] !== undefined) throw usage(file, `option ${k} is not valid for raw images`);
    }
    if (opts.preallocation === 'metadata') throw usage(file, 'preallocation=metadata is not valid for raw images');
    const f = await NodeImageFile.open(file, { writable: true, create: true, truncate: opts.overwrite === true });
    try {
      await f.truncate(size);
      await f.sync();
    } finally {
      await f.close();
    }
    return;
  }
  if (size % 512 !== 0) throw usage(file, `size ${size} is not a multiple of 512 bytes`);
  if (opts.format === 'qcow') return createQcow1(file, size, opts, backingFormat);
  return createQcow2(file, size, opts, backingFormat);
}

async function createQcow1(file: string, size: number, opts: CreateOptions, _backingFormat: ImageFormat | undefined): Promise<void> {
  for (const k of ['clusterSize', 'compat', 'lazyRefcounts', 'refcountBits'] as const) {
    if (opts[k] !== undefined) throw usage(file, `option ${k} is not valid for qcow (version 1) images`);
  }
  if (opts.preallocation === 'metadata') throw usage(file, 'preallocation=metadata is not valid for qcow images');
  // QEMU: 4 KiB clusters and 512-entry L2 tables, or 512 B / 4096 with a backing file.
  const h = new QcowHeader({ size, clusterBits: opts.backingFile !== undefined ? 9 : 12, l2Bits: opts.backingFile !== undefined ? 12 : 9, backingFile: opts.backingFile });
  const head = h.serialize();
  h.l1TableOffset = (head.length + 7) & ~7;
  const l1Bytes = Math.ceil((h.l1Size * 8) / 512) * 512;
  const f = await NodeImageFile.open(file, { writable: true, create: true, truncate: opts.overwrite === true });
  try {
    await f.write(h.serialize(), 0);
    await f.write(new Uint8Array(l1Bytes), h.l1TableOffset);
    await f.sync();
  } finally {
    await f.close();
  }
}

function log2(n: number): number {
  return Math.round(Math.log2(n));
}

async function createQcow2(file: string, size: number, opts: CreateOptions, backingFormat: ImageFormat | undefined): Promise<void> {
  const cs = opts.clusterSize ?? 65536;
  const cb = log2(cs);
  if (!Number.isSafeInteger(cs) || 2 ** cb !== cs || cb < MIN_CLUSTER_BITS || cb > MAX_CLUSTER_BITS) {
    throw usage(file, `cluster_size ${cs} must be a power of two between 512 and 2M`);
  }
  const version = (opts.compat ?? '1.1') === '1.1' ? 3 : 2;
  const rbits = opts.refcountBits ?? 16;
  const order = log2(rbits);
  if (2 ** order !== rbits || order < 0 || order > 6) throw usage(file, `refcount_bits ${rbits} must be a power of two between 1 and 64`);
  if (version === 2 && rbits !== 16) throw usage(file, 'refcount_bits other than 16 needs compat=1.1');
  if (version === 2 && opts.lazyRefcounts) throw usage(file, 'lazy_refcounts=on needs compat=1.1');
  const l2Entries = cs / 8;
  const l1Size = Math.ceil(size / (cs * l2Entries));
  const l1Clusters = Math.max(1, Math.ceil((l1Size * 8) / cs));
  if (l1Size * 8 > 32 * 1024 * 1024) throw usage(file, `size ${size} needs an L1 table of ${l1Size} entries, more than QEMU's 32 MiB limit`);

  const h = new Qcow2Header({
    version,
    clusterBits: cb,
    size,
    refcountOrder: order,
    refcountTableOffset: cs,
    refcountTableClusters: 1,
    l1Size,
    l1TableOffset: 3 * cs,
    compatibleFeatures: opts.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0n,
    featureTable: version === 3 && cs >= 8192 ? QEMU_FEATURE_TABLE.slice() : undefined,
    backingFile: opts.backingFile,
    backingFormat: opts.backingFile !== undefined ? backingFormat : undefined,
  });
  const f = await NodeImageFile.open(file, { writable: true, create: true, truncate: opts.overwrite === true });
  try {
    await f.write(h.serialize(), 0);
    const table = new Uint8Array(cs);
    new DataView(table.buffer).setBigUint64(0, BigInt(2 * cs));
    await f.write(table, cs);
    const block = new Uint8Array(cs);
    for (let c = 0; c < 3; c++) setRefcount(block, c, order, 1);
    await f.write(block, 2 * cs);
    const rc = await RefcountManager.load(f, { clusterBits: cb, refcountOrder: order, tableOffset: cs, tableClusters: 1 });
    rc.onTableMoved = (off, n) => {
      h.refcountTableOffset = off;
      h.refcountTableClusters = n;
    };
    h.l1TableOffset = await rc.allocate(l1Clusters);
    const l1 = new Uint8Array(l1Clusters * cs);
    let end = h.l1TableOffset + l1Clusters * cs;
    if (opts.preallocation === 'metadata') end = Math.max(end, await preallocateMetadata(f, rc, h, l1));
    await rc.flush();
    // The L1 (written whole) and a sparse extension over every allocated cluster.
    await f.write(l1, h.l1TableOffset);
    if ((await f.size()) < end) await f.truncate(end);
    await f.write(h.serialize(), 0);
    await f.sync();
  } catch (e) {
    await f.close().catch(() => undefined);
    fs.rmSync(file, { force: true });
    throw e;
  }
  await f.close();
}

/** Allocates every L2 table and data cluster; returns the end of the last allocated cluster. */
async function preallocateMetadata(f: ImageFile, rc: RefcountManager, h: Qcow2Header, l1: Uint8Array): Promise<number> {
  const cs = h.clusterSize;
  const l2Entries = cs / 8;
  const totalClusters = Math.ceil(h.size / cs);
  const l1v = new DataView(l1.buffer);
  let end = 0;
  for (let i = 0; i < h.l1Size; i++) {
    const l2Off = await rc.allocate(1);
    const n = Math.min(l2Entries, totalClusters - i * l2Entries);
    const dataOff = await rc.allocate(n);
    const l2 = new Uint8Array(cs);
    const v = new DataView(l2.buffer);
    for (let j = 0; j < n; j++) v.setBigUint64(j * 8, BigInt(dataOff + j * cs) | QCOW2_COPIED);
    await f.write(l2, l2Off);
    l1v.setBigUint64(i * 8, BigInt(l2Off) | QCOW2_COPIED);
    end = Math.max(end, l2Off + cs, dataOff + n * cs);
  }
  if (end > 2 ** 56) throw new DiskError('E_USAGE', `Cannot preallocate: the image would end at ${hex(end)}`);
  return end;
}
