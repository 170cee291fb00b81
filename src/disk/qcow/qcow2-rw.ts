/**
 * The read-write qcow2 ops table and its opener (plugged into `FORMATS.qcow2.readWrite` in
 * open.ts). Reads go through the read path's `Qcow2State` (which sees the write path's dirty L2 tables in
 * the shared cache); writes, zeroes, discards and flushes go through `Qcow2Writer` (alloc.ts).
 *
 * Refused for writing: the corrupt bit (repair first with `vblk check -r all`), extended L2
 * entries, external data files, encryption, compression types other than deflate (the read-only
 * open refuses the last three already). An image opened with the dirty bit set (lazy refcounts
 * after a crash) has its refcounts rebuilt first, as QEMU does.
 */
import { DiskError } from '../../errors';
import { DiskImage } from '../disk-image';
import type { ImageFile } from '../file';
import type { DiskImageOps } from '../types';
import { SECTOR_SIZE } from '../types';
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTL2 } from './header';
import { openQcow2State, type Qcow2OpenOptions } from './qcow2';
import { RefcountManager } from './refcount';
import { Qcow2Writer, type MetadataExtent } from './alloc';
import { readSnapshotTable } from './snapshot-table';
import { repairRefcounts } from './check';
import { writeByCluster } from './chain';

/** The qcow2 read-write ops table. */
export const qcow2ReadWriteOps: DiskImageOps<Qcow2Writer> = {
  name: 'qcow2-rw',
  readSector(disk, sector, buf) {
    const s = disk.priv.s;
    const p = s.readFast(sector * SECTOR_SIZE, buf) ?? s.readAt(sector * SECTOR_SIZE, buf);
    return p.then(() => buf.length);
  },
  async writeSector(disk, sector, buf) {
    const w = disk.priv;
    const off = sector * SECTOR_SIZE;
    const whole = (off % w.clusterSize) + buf.length > w.clusterSize ? w.tryInPlaceRange(off, buf) : undefined;
    if (whole) await whole;
    else await writeByCluster(off, buf, w.clusterSize, (o, piece) => w.writeInCluster(o, piece));
    return buf.length;
  },
  flush(disk) {
    return disk.priv.flush();
  },
  close(disk) {
    return disk.priv.close();
  },
  discard(disk, sector, count) {
    return disk.priv.zeroRange(sector * SECTOR_SIZE, count * SECTOR_SIZE, 'discard', true);
  },
  writeZeroes(disk, sector, count, unmap) {
    return disk.priv.zeroRange(sector * SECTOR_SIZE, count * SECTOR_SIZE, 'zero', unmap);
  },
  blockStatus(disk, offset, length) {
    return disk.priv.blockStatus(offset, length);
  },
  describe(disk) {
    return disk.priv.describe();
  },
};

/**
 * Opens a qcow2 image read-write over an open, writable file (closing it when opening fails).
 *
 * @throws DiskError E_QCOW_CORRUPT (corrupt bit set), E_QCOW_UNSUPPORTED (a feature the write
 *   path does not implement), and everything `openQcow2State` throws.
 */
export async function openQcow2ReadWrite(file: ImageFile, opts: Qcow2OpenOptions): Promise<DiskImage<Qcow2Writer>> {
  let writer: Qcow2Writer | undefined;
  try {
    let state = await openQcow2State(file, opts);
    let h = state.header;
    if (h.incompatibleFeatures & INCOMPAT_CORRUPT) {
      throw new DiskError('E_QCOW_CORRUPT', `Cannot open ${opts.path} read-write: the image is marked corrupt (incompatible bit 1); open it read-only or repair it with "vblk check -r all"`);
    }
    if (h.incompatibleFeatures & INCOMPAT_EXTL2) {
      throw new DiskError('E_QCOW_UNSUPPORTED', `Cannot open ${opts.path} read-write: writing images with extended L2 entries is not supported; open it read-only`);
    }
    if (h.incompatibleFeatures & INCOMPAT_DIRTY) {
      // Lazy refcounts after an unclean close: rebuild the refcounts, clear the bit, reopen state.
      if (state.backing) await state.backing.close();
      await repairRefcounts(file, h, { clearDirty: true });
      state = await openQcow2State(file, opts);
      h = state.header;
    }
    // The refcount manager writes blocks and grown tables itself: keep the writer's idea of the
    // file size (it decides whether a new cluster lies past EOF and reads as zeroes) up to date.
    const st = state;
    const rcFile: ImageFile = {
      path: file.path,
      writable: file.writable,
      read: (b, pos) => file.read(b, pos),
      write: (b, pos) => {
        if (pos + b.length > st.fileSize) st.fileSize = pos + b.length;
        return file.write(b, pos);
      },
      sync: () => file.sync(),
      size: () => file.size(),
      truncate: (n) => file.truncate(n),
      close: () => file.close(),
    };
    const rc = await RefcountManager.load(rcFile, {
      clusterBits: h.clusterBits,
      refcountOrder: h.refcountOrder,
      tableOffset: h.refcountTableOffset,
      tableClusters: h.refcountTableClusters,
    });
    const fixed: MetadataExtent[] = [];
    if (h.nbSnapshots > 0) {
      const snaps = await readSnapshotTable(file, h);
      fixed.push({ offset: h.snapshotsOffset, bytes: snaps.bytes, name: 'the snapshot table' });
      snaps.list.forEach((sn, i) => fixed.push({ offset: sn.l1Offset, bytes: sn.l1Size * 8, name: `the L1 table of snapshot ${i}` }));
    }
    if (h.crypto) fixed.push({ offset: h.crypto.offset, bytes: h.crypto.length, name: 'the encryption header' });
    writer = new Qcow2Writer(state, rc, fixed);
  } catch (e) {
    await file.close().catch(() => undefined);
    throw e;
  }
  return new DiskImage<Qcow2Writer>({ path: opts.path, format: 'qcow2', size: writer.s.size, readonly: false, ops: qcow2ReadWriteOps, priv: writer });
}
