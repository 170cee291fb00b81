/**
 * The qcow2 internal snapshot table (qcow2.md, "Snapshot table"): a run of variable-length
 * entries at `snapshots_offset`. Only what the checker and the write path need is decoded: each
 * snapshot's L1 table and the bytes the table spans.
 */
import { DiskError, hex } from '../../errors';
import type { ImageFile } from '../file';
import type { Qcow2Header } from './header';

/** One snapshot's L1 table, as its table entry gives it. */
export interface SnapshotL1 {
  readonly l1Offset: number;
  readonly l1Size: number;
}

/** QEMU's cap on one entry's extra data (QCOW_MAX_SNAPSHOT_EXTRA_DATA is 1 KiB; we allow more). */
const MAX_EXTRA_DATA = 1024 * 1024;
/** The fixed part of an entry. */
const ENTRY_FIXED = 40;

/**
 * Reads the snapshot table: every snapshot's L1 table and the table's length in bytes.
 *
 * @throws DiskError E_QCOW_CORRUPT when the table is cut off by the end of the file or an entry's
 *   extra data size is implausible.
 */
export async function readSnapshotTable(file: ImageFile, h: Qcow2Header): Promise<{ list: SnapshotL1[]; bytes: number }> {
  const list: SnapshotL1[] = [];
  let off = h.snapshotsOffset;
  const fixed = Buffer.alloc(ENTRY_FIXED);
  for (let i = 0; i < h.nbSnapshots; i++) {
    if ((await file.read(fixed, off)) < ENTRY_FIXED) {
      throw new DiskError('E_QCOW_CORRUPT', `Cannot read snapshot ${i}: the table at ${hex(h.snapshotsOffset)} is cut off`);
    }
    const l1Offset = Number(fixed.readBigUInt64BE(0));
    const l1Size = fixed.readUInt32BE(8);
    const idLen = fixed.readUInt16BE(12);
    const nameLen = fixed.readUInt16BE(14);
    const extra = fixed.readUInt32BE(36);
    if (extra > MAX_EXTRA_DATA) throw new DiskError('E_QCOW_CORRUPT', `Cannot read snapshot ${i}: extra data size ${extra} is too large`);
    // Entries are padded to 8 bytes. (Arithmetic, not `& ~7`: offsets exceed 32 bits.)
    off = Math.ceil((off + ENTRY_FIXED + extra + idLen + nameLen) / 8) * 8;
    list.push({ l1Offset, l1Size });
  }
  return { list, bytes: off - h.snapshotsOffset };
}
