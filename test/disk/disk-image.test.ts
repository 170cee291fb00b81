/** The checks DiskImage does once for every ops table, and the codes its errors carry. */
import { expect } from 'chai';
import { isVblkError } from '../../src/errors';
import { createMemoryDisk } from '../../src/disk/memory-disk';
import { rejectionOf } from '../helpers/rejection';

describe('DiskImage', () => {
  it('a discard on an ops table without discard is E_DISK_UNSUPPORTED, not an I/O error', async () => {
    const disk = createMemoryDisk({ size: 1 << 20, discard: false });
    const e = await rejectionOf(disk.discard(0, 8));
    expect(isVblkError(e, 'E_DISK_UNSUPPORTED'), String(e)).to.equal(true);
    expect(disk.priv.counts.discard).to.equal(0);
  });

  it('a failure of the host file is E_DISK_IO', async () => {
    const disk = createMemoryDisk({ size: 1 << 20, fail: (op) => op === 'read' });
    const e = await rejectionOf(disk.readSector(0, new Uint8Array(512)));
    expect(isVblkError(e, 'E_DISK_IO'), String(e)).to.equal(true);
  });
});
