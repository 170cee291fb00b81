/**
 * The writer's idea of the file size must cover every byte written, including refcount blocks and
 * tables that the RefcountManager writes itself: a new cluster at or past that size is treated as
 * reading zeroes, so its zero head and tail are not written (as QEMU does at EOF).
 */
import { expect } from 'chai';
import * as fs from 'node:fs';
import { createImage } from '../../src/disk/qcow/create';
import { openQcow2ReadWrite } from '../../src/disk/qcow/qcow2-rw';
import { NodeImageFile } from '../../src/disk/file';
import { useTempDir } from '../helpers/qemu';

describe('qcow2 read-write: tracked file size', function () {
  this.timeout(30000);
  const tmp = useTempDir('vblk-fsize-');

  it('covers the refcount blocks the allocator appends after a data cluster', async () => {
    const img = tmp.file('a.qcow2');
    // 512-byte clusters with 64-bit refcounts: one refcount block per 64 clusters.
    await createImage(img, { format: 'qcow2', size: 1 << 20, clusterSize: 512, refcountBits: 64 });
    const file = await NodeImageFile.open(img, { writable: true });
    const disk = await openQcow2ReadWrite(file, { path: img });
    try {
      let blocksAdded = 0;
      let lastTable = disk.priv.rc.table.filter((o) => o !== 0).length;
      for (let c = 0; c < 300; c++) {
        await disk.writeSector(c, new Uint8Array(512).fill(1 + (c % 200)));
        const blocks = disk.priv.rc.table.filter((o) => o !== 0).length;
        if (blocks !== lastTable) blocksAdded++;
        lastTable = blocks;
        const real = fs.statSync(img).size;
        expect(disk.priv.s.fileSize, `after writing cluster ${c}`).to.be.at.least(real);
      }
      expect(blocksAdded, 'the workload must add refcount blocks').to.be.greaterThan(2);
    } finally {
      await disk.close();
    }
  });
});
