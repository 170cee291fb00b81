/**
 * vblk's own qcow2 consistency checker and refcount repair, modelled on QEMU's
 * `qcow2_check_refcounts()` (block/qcow2-refcount.c) so that its verdict (exit-code class and
 * counts) agrees with `qemu-img check`:
 * - references are counted from the header, the active L1/L2 tables, every snapshot's L1/L2
 *   tables, the snapshot table, the refcount table and refcount blocks;
 * - each cluster's stored refcount is compared with its reference count: higher is a leak, lower a
 *   corruption (a stored 0 with references, or a refcount block whose refcount is not 1, means
 *   the refcount structure must be rebuilt);
 * - entries are checked for alignment, reserved bits, and for pointing past the end of the file;
 * - COPIED flags of the active tables must match "refcount == 1".
 * Repair (`-r leaks` / `-r all`) lowers leaked refcounts, raises too-low ones, fixes COPIED flags,
 * and when the structure is broken (`-r all`) writes a new refcount table and blocks past the end
 * of the file and switches the header to them.
 */
import { DiskError, hex } from '../../errors';
import type { ImageFile } from '../file';
import { NodeImageFile } from '../file';
import { INCOMPAT_DIRTY, INCOMPAT_KNOWN, type Qcow2Header } from './header';
import { readQcow2Header, assertReadable } from './qcow2';
import { RefcountManager, setRefcount, refblockEntries } from './refcount';
import { readSnapshotTable, type SnapshotL1 } from './snapshot-table';
import { QCOW2_COMPRESSED, QCOW2_COPIED, QCOW2_ZERO, qcow2Compressed, qcow2EntryOffset } from './entry';

const L1E_RESERVED_MASK = 0x7f000000000001ffn;
const L2E_RESERVED_MASK = 0x3f000000000001fen;

/** What a check found (and fixed), as `qemu-img check --output=json` reports it. */
export interface CheckResult {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  /** Per-problem lines (QEMU prints them to stderr). */
  messages: string[];
}

export type RepairMode = 'leaks' | 'all';

function emptyResult(): CheckResult {
  return {
    corruptions: 0,
    leaks: 0,
    checkErrors: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    imageEndOffset: 0,
    totalClusters: 0,
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
    messages: [],
  };
}

/** `qemu-img check` exit code for a result: 0 clean, 1 check errors, 2 corruptions, 3 leaks only. */
export function checkExitCode(r: CheckResult): number {
  if (r.checkErrors > 0) return 1;
  if (r.corruptions > 0) return 2;
  if (r.leaks > 0) return 3;
  return 0;
}

/** Growable per-cluster reference counter. */
class RefArray {
  a = new Uint32Array(1024);
  /** One past the highest index ever counted. */
  end = 0;
  get(i: number): number {
    return this.a[i] ?? 0;
  }
  inc(i: number): void {
    if (i >= this.end) this.end = i + 1;
    if (i >= this.a.length) {
      const n = new Uint32Array(Math.max(i + 1, this.a.length * 2));
      n.set(this.a);
      this.a = n;
    }
    this.a[i] = (this.a[i] ?? 0) + 1;
  }
}

/** Reads `n` big-endian u64 entries at `off`. */
async function readEntries(file: ImageFile, off: number, n: number): Promise<bigint[]> {
  const b = Buffer.alloc(n * 8);
  const got = await file.read(b, off);
  if (got < b.length) b.fill(0, got);
  const out: bigint[] = [];
  for (let i = 0; i < n; i++) out.push(b.readBigUInt64BE(i * 8));
  return out;
}

/** The reference walk: everything except the comparison. */
class Walker {
  readonly refs = new RefArray();
  readonly res: CheckResult;
  readonly cs: number;
  constructor(
    readonly file: ImageFile,
    readonly h: Qcow2Header,
    readonly fileSize: number,
    res: CheckResult,
    readonly progress?: CheckProgress,
  ) {
    this.res = res;
    this.cs = h.clusterSize;
  }

  /** Counts a reference to every cluster of `[off, off+size)`, refusing regions past EOF. */
  inc(off: number, size: number): void {
    if (size <= 0) return;
    if (off + size > this.fileSize && off + size - this.fileSize >= this.cs) {
      this.res.messages.push(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset ${hex(off)} size ${hex(size)}`);
      this.res.corruptions++;
      return;
    }
    const first = Math.floor(off / this.cs);
    const last = Math.floor((off + size - 1) / this.cs);
    for (let c = first; c <= last; c++) this.refs.inc(c);
  }

  async l1(l1Offset: number, l1Size: number, active: boolean): Promise<void> {
    this.inc(l1Offset, l1Size * 8);
    if (l1Size === 0) return;
    const l1 = await readEntries(this.file, l1Offset, l1Size);
    for (let i = 0; i < l1Size; i++) {
      if (active) this.progress?.(i + 1, l1Size);
      const e = l1[i] ?? 0n;
      if (e === 0n) continue;
      if (e & L1E_RESERVED_MASK) {
        // Reported, and the table is still walked (as QEMU does).
        this.res.messages.push(`ERROR found L1 entry with reserved bits set: ${e.toString(16)}`);
        this.res.corruptions++;
      }
      const l2 = qcow2EntryOffset(e);
      if (l2 === 0) continue;
      if (l2 % this.cs !== 0) {
        this.res.messages.push(`ERROR l2_offset=${l2.toString(16)}: Table is not cluster aligned; L1 entry corrupted`);
        this.res.corruptions++;
        continue;
      }
      this.inc(l2, this.cs);
      if (l2 >= this.fileSize) continue;
      await this.l2(l2, active);
    }
  }

  async l2(l2Offset: number, active: boolean): Promise<void> {
    const h = this.h;
    const n = this.cs / 8;
    const entries = await readEntries(this.file, l2Offset, n);
    let nextContiguous = 0;
    for (const e of entries) {
      if (e & QCOW2_COMPRESSED) {
        const { host: off, sectors } = qcow2Compressed(e, h.clusterBits);
        if (e & QCOW2_COPIED) {
          this.res.messages.push(`ERROR: cluster ${Math.floor(off / this.cs)}: copied flag must never be set for compressed clusters`);
          this.res.corruptions++;
        }
        this.inc(off - (off % 512), sectors * 512);
        if (active) {
          this.res.allocatedClusters++;
          this.res.compressedClusters++;
          this.res.fragmentedClusters++;
        }
        continue;
      }
      const off = qcow2EntryOffset(e);
      const zero = (e & QCOW2_ZERO) !== 0n && h.version === 3;
      if (e & L2E_RESERVED_MASK) {
        this.res.messages.push(`ERROR found L2 entry with reserved bits set: ${e.toString(16)}`);
        this.res.corruptions++;
      }
      if (off === 0) continue;
      if (off % this.cs !== 0) {
        // Reported; the (unaligned) range still counts as referenced, as in QEMU.
        this.res.messages.push(`ERROR offset=${off.toString(16)}: ${zero ? 'Preallocated' : 'Data'} cluster is not properly aligned; L2 entry corrupted.`);
        this.res.corruptions++;
      }
      if (active) {
        this.res.allocatedClusters++;
        if (nextContiguous !== 0 && off !== nextContiguous) this.res.fragmentedClusters++;
        nextContiguous = off + this.cs;
      }
      this.inc(off, this.cs);
    }
  }
}

/** Everything `compare` needs to know about one open image. */
interface Session {
  file: ImageFile;
  h: Qcow2Header;
  fileSize: number;
  rc: RefcountManager;
  walker: Walker;
  snapshots: SnapshotL1[];
}

async function walk(file: ImageFile, h: Qcow2Header, res: CheckResult, progress?: CheckProgress): Promise<Session> {
  const fileSize = await file.size();
  const walker = new Walker(file, h, fileSize, res, progress);
  walker.inc(0, h.clusterSize);
  await walker.l1(h.l1TableOffset, h.l1Size, true);
  const snaps = h.nbSnapshots > 0 ? await readSnapshotTable(file, h) : { list: [], bytes: 0 };
  for (const s of snaps.list) await walker.l1(s.l1Offset, s.l1Size, false);
  walker.inc(h.snapshotsOffset, snaps.bytes);
  if (h.crypto) walker.inc(h.crypto.offset, h.crypto.length);
  walker.inc(h.refcountTableOffset, h.refcountTableClusters * h.clusterSize);
  const rc = await RefcountManager.load(file, {
    clusterBits: h.clusterBits,
    refcountOrder: h.refcountOrder,
    tableOffset: h.refcountTableOffset,
    tableClusters: h.refcountTableClusters,
  });
  return { file, h, fileSize, rc, walker, snapshots: snaps.list };
}

/** Counts the refcount blocks (after the data walk); returns true when a rebuild is needed. */
function countRefblocks(s: Session, res: CheckResult): boolean {
  let rebuild = false;
  const nb = Math.ceil(s.fileSize / s.h.clusterSize);
  s.rc.table.forEach((off, i) => {
    if (off === 0) return;
    const c = off / s.h.clusterSize;
    if (c >= nb) {
      res.messages.push(`ERROR refcount block ${i} is outside image`);
      res.corruptions++;
      rebuild = true;
      return;
    }
    s.walker.inc(off, s.h.clusterSize);
    if (s.walker.refs.get(c) !== 1) {
      res.messages.push(`ERROR refcount block ${i} refcount=${s.walker.refs.get(c)}`);
      res.corruptions++;
      rebuild = true;
    }
  });
  return rebuild;
}

/** Compares stored and counted refcounts; fixes what `fix` allows. Returns the highest used cluster. */
async function compare(s: Session, res: CheckResult, fix: RepairMode | undefined, rebuildOut: { rebuild: boolean }): Promise<number> {
  const nb = Math.max(Math.ceil(s.fileSize / s.h.clusterSize), s.walker.refs.end);
  let highest = 0;
  for (let i = 0; i < nb; i++) {
    const r1 = await s.rc.get(i);
    const r2 = s.walker.refs.get(i);
    if (r1 > 0 || r2 > 0) highest = i;
    if (r1 === r2) continue;
    let fixed = false;
    if (r1 === 0) rebuildOut.rebuild = true;
    else if ((r1 > r2 && fix !== undefined) || (r1 < r2 && fix === 'all')) fixed = true;
    res.messages.push(`${fixed ? 'Repairing' : r1 < r2 ? 'ERROR' : 'Leaked'} cluster ${i} refcount=${r1} reference=${r2}`);
    if (fixed) {
      await s.rc.set(i, r2);
      if (r1 > r2) res.leaksFixed++;
      else res.corruptionsFixed++;
      continue;
    }
    if (r1 < r2) res.corruptions++;
    else res.leaks++;
  }
  return highest;
}

/** COPIED flags of the active L1 and L2 tables must say "refcount == 1". */
async function checkCopied(s: Session, res: CheckResult, fix: boolean): Promise<void> {
  const { h, file, rc } = s;
  const cs = h.clusterSize;
  const l1 = await readEntries(file, h.l1TableOffset, h.l1Size);
  let l1Dirty = false;
  for (let i = 0; i < h.l1Size; i++) {
    const e = l1[i] ?? 0n;
    const l2 = qcow2EntryOffset(e);
    if (l2 === 0 || l2 % cs !== 0 || l2 >= s.fileSize) continue;
    const r = await rc.getAt(l2);
    if ((r === 1) !== ((e & QCOW2_COPIED) !== 0n)) {
      res.messages.push(`${fix ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${e.toString(16)} refcount=${r}`);
      if (fix) {
        l1[i] = r === 1 ? e | QCOW2_COPIED : e & ~QCOW2_COPIED;
        l1Dirty = true;
        res.corruptionsFixed++;
      } else res.corruptions++;
    }
    const l2e = await readEntries(file, l2, cs / 8);
    let dirty = false;
    for (let j = 0; j < l2e.length; j++) {
      const x = l2e[j] ?? 0n;
      if (x & QCOW2_COMPRESSED) continue;
      const off = qcow2EntryOffset(x);
      if (off === 0) continue;
      const rr = await rc.getAt(off);
      if ((rr === 1) !== ((x & QCOW2_COPIED) !== 0n)) {
        res.messages.push(`${fix ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${x.toString(16)} refcount=${rr}`);
        if (fix) {
          l2e[j] = rr === 1 ? x | QCOW2_COPIED : x & ~QCOW2_COPIED;
          dirty = true;
          res.corruptionsFixed++;
        } else res.corruptions++;
      }
    }
    if (dirty) {
      const b = Buffer.alloc(cs);
      l2e.forEach((x, j) => b.writeBigUInt64BE(x, j * 8));
      await file.write(b, l2);
    }
  }
  if (l1Dirty) {
    const b = Buffer.alloc(h.l1Size * 8);
    l1.forEach((x, j) => b.writeBigUInt64BE(x, j * 8));
    await file.write(b, h.l1TableOffset);
  }
}

/**
 * Writes a brand-new refcount structure (blocks, then the table) past the end of the file from
 * the counted references, syncs, and switches the header to it (then syncs again). The old
 * structure is simply no longer referenced.
 */
async function rebuild(s: Session): Promise<void> {
  const { h, file } = s;
  const cs = h.clusterSize;
  const rb = refblockEntries(h.clusterBits, h.refcountOrder);
  // Counted references without the old refcount structures.
  const refs = new RefArray();
  const old = new Set<number>();
  for (let c = 0; c < h.refcountTableClusters; c++) old.add(h.refcountTableOffset / cs + c);
  for (const off of s.rc.table) if (off !== 0) old.add(off / cs);
  let highest = 0;
  for (let i = 0; i < s.walker.refs.end; i++) {
    const n = old.has(i) ? 0 : s.walker.refs.get(i);
    for (let k = 0; k < n; k++) refs.inc(i);
    if (n > 0) highest = i;
  }
  const start = Math.max(Math.ceil(s.fileSize / cs), highest + 1);
  let k = 1;
  let t = 1;
  for (let iter = 0; iter < 64; iter++) {
    const k2 = Math.ceil((start + k + t) / rb);
    const t2 = Math.ceil((k2 * 8) / cs);
    if (k2 === k && t2 === t) break;
    k = k2;
    t = t2;
  }
  for (let c = start; c < start + k + t; c++) refs.inc(c);
  const tableBuf = Buffer.alloc(t * cs);
  for (let r = 0; r < k; r++) {
    const block = new Uint8Array(cs);
    for (let j = 0; j < rb; j++) {
      const v = refs.get(r * rb + j);
      if (v > 0) setRefcount(block, j, h.refcountOrder, v);
    }
    await file.write(block, (start + r) * cs);
    tableBuf.writeBigUInt64BE(BigInt((start + r) * cs), r * 8);
  }
  await file.write(tableBuf, (start + k) * cs);
  await file.sync();
  const hdr = Buffer.alloc(12);
  hdr.writeBigUInt64BE(BigInt((start + k) * cs), 0);
  hdr.writeUInt32BE(t, 8);
  await file.write(hdr, 48);
  await file.sync();
  h.refcountTableOffset = (start + k) * cs;
  h.refcountTableClusters = t;
}

/**
 * Checks (and with `fix`, repairs) the qcow2 image open in `file` whose header is `h`.
 */
/**
 * Called while the active L1 table is walked (the long part of a check): `done` of `total` L1
 * entries have been visited. `vblk check` turns it into progress on a TTY.
 */
export type CheckProgress = (done: number, total: number) => void;

export async function checkQcow2File(file: ImageFile, h: Qcow2Header, fix?: RepairMode, progress?: CheckProgress): Promise<CheckResult> {
  const res = emptyResult();
  res.totalClusters = Math.ceil(h.size / h.clusterSize);
  let s = await walk(file, h, res, progress);
  const flags = { rebuild: countRefblocks(s, res) };
  const pre = { ...res, messages: [...res.messages] };
  let highest = await compare(s, res, undefined, flags);
  if (flags.rebuild && fix === 'all') {
    res.messages.push('Rebuilding refcount structure');
    const before = { corruptions: res.corruptions, leaks: res.leaks };
    await rebuild(s);
    // Recount against the new structure.
    const again = emptyResult();
    again.totalClusters = res.totalClusters;
    s = await walk(file, h, again);
    countRefblocks(s, again);
    highest = await compare(s, again, 'leaks', { rebuild: false });
    await s.rc.flush();
    res.corruptionsFixed += Math.max(0, before.corruptions - again.corruptions);
    res.leaksFixed += Math.max(0, before.leaks - again.leaks);
    res.corruptions = again.corruptions;
    res.leaks = again.leaks;
    res.messages.push(...again.messages);
  } else if (fix !== undefined) {
    if (flags.rebuild) {
      res.messages.push('ERROR need to rebuild refcount structures');
      res.checkErrors++;
      return res;
    }
    if (res.leaks > 0 || res.corruptions > 0) {
      Object.assign(res, pre);
      highest = await compare(s, res, fix, flags);
      await s.rc.flush();
    }
  }
  // With -r leaks, COPIED flags are repaired only when the refcounts are right by now (QEMU).
  const fixCopied = fix === 'all' || (fix === 'leaks' && res.checkErrors === 0 && res.corruptions === 0 && res.leaks === 0);
  await checkCopied(s, res, fixCopied);
  if (fix !== undefined) await file.sync();
  res.imageEndOffset = (highest + 1) * h.clusterSize;
  return res;
}

/**
 * Opens `path` and checks it (`fix` opens it writable). Images vblk cannot check (unknown
 * incompatible features, not qcow2) reject with a DiskError; the CLI maps that to exit 1.
 */
export async function checkQcow2(path: string, fix?: RepairMode, progress?: CheckProgress): Promise<CheckResult> {
  const file = await NodeImageFile.open(path, { writable: fix !== undefined });
  try {
    const h = await readQcow2Header(file, path, await file.size());
    if (h.incompatibleFeatures & ~INCOMPAT_KNOWN) assertReadable(path, h);
    if (h.bitmaps) throw new DiskError('E_QCOW_UNSUPPORTED', `Cannot check ${path}: images with persistent bitmaps are not supported by vblk check`);
    return await checkQcow2File(file, h, fix, progress);
  } finally {
    await file.close();
  }
}

/**
 * Repairs refcounts in place (leaks and too-low refcounts, rebuilding the structure when needed)
 * and, with `clearDirty`, clears the dirty bit afterwards (lazy refcounts after a crash).
 */
export async function repairRefcounts(file: ImageFile, h: Qcow2Header, opts: { clearDirty?: boolean } = {}): Promise<CheckResult> {
  const res = await checkQcow2File(file, h, 'all');
  if (res.corruptions > 0 || res.checkErrors > 0) {
    throw new DiskError('E_QCOW_CORRUPT', `Cannot repair ${file.path}: ${res.corruptions} corruptions remain after rebuilding the refcounts (${res.messages.slice(-1)[0] ?? ''})`);
  }
  if (opts.clearDirty && h.incompatibleFeatures & INCOMPAT_DIRTY) {
    h.incompatibleFeatures &= ~INCOMPAT_DIRTY;
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt.asUintN(64, h.incompatibleFeatures));
    await file.write(b, 72);
    await file.sync();
  }
  return res;
}
