/**
 * Ordering of an L2 eviction write-back (reference/qcow2.md 5.2: refcounts before the L2 entry
 * that uses a cluster). The sampled crash matrix rarely lands inside an eviction whose table is
 * newer than the last refcount flush, so this test builds that case on purpose: allocate a
 * cluster (its refcount is only in the cache), then read through four other L2 tables with a
 * 4-table cache so the dirty table is evicted, and crash after every write of that eviction.
 */
import { expect } from 'chai';
import * as fs from 'node:fs';
import { createImage } from '../../src/disk/qcow/create';
import { openQcow2ReadWrite } from '../../src/disk/qcow/qcow2-rw';
import { FaultyFile, type FaultPlan } from '../../src/disk/faulty-file';
import { NodeImageFile } from '../../src/disk/file';
import { requireQemu, useTempDir, qemuIo } from '../helpers/qemu';
import { qemuCheck } from './workload';

const SIZE = 2 << 20;
const CS = 512; // one L2 table covers 64 clusters = 32 KiB
const REGION = (CS / 8) * CS;

/** Allocates in region 0, then reads regions 1..4 (evicting region 0's dirty table). */
async function scenario(img: string, plan: FaultPlan): Promise<{ before: number; after: number }> {
  const file = new FaultyFile(await NodeImageFile.open(img, { writable: true }), plan);
  const disk = await openQcow2ReadWrite(file, { path: img, l2CacheBytes: 4 * CS });
  let before = 0;
  try {
    await disk.writeSector(0, new Uint8Array(CS).fill(0x5a));
    before = file.writes;
    const buf = new Uint8Array(CS);
    for (let r = 1; r <= 4; r++) await disk.readSector((r * REGION) / 512, buf);
  } catch {
    // injected crash: nothing more to do
  }
  const after = file.writes;
  await disk.close().catch(() => undefined);
  return { before, after };
}

describe('qcow2 read-write: L2 eviction write-back ordering', function () {
  this.timeout(60000);
  const tmp = useTempDir('vblk-evict-');

  it('a crash after any write of an eviction write-back leaves no reference to a cluster with refcount 0', async function () {
    requireQemu(this);
    const template = tmp.file('template.qcow2');
    await createImage(template, { format: 'qcow2', size: SIZE, clusterSize: CS });
    qemuIo(template, [1, 2, 3, 4].map((r) => `write -P 1 ${r * REGION} 512`)); // L2 tables to read through
    const probe = tmp.file('probe.qcow2');
    fs.copyFileSync(template, probe);
    const { before, after } = await scenario(probe, {});
    expect(qemuCheck(probe).status).to.equal(0);
    // The eviction wrote the refcount block and the table (at least two writes).
    expect(after - before).to.be.at.least(2);
    for (let n = before + 1; n <= after; n++) {
      const img = tmp.file(`crash-${n}.qcow2`);
      fs.copyFileSync(template, img);
      await scenario(img, { crashAfterWrite: n, unsynced: 'keep' });
      const c = qemuCheck(img);
      expect([0, 3], `crash after write ${n} (eviction writes ${before + 1}..${after}): ${c.out}`).to.include(c.status);
      fs.rmSync(img);
    }
  });
});
