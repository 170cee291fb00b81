/**
 * qcow (version 1) read-write: random workloads on plain, overlay and compressed images stay
 * identical to a raw mirror (qemu-img compare), and qemu-io reads what vblk wrote.
 */
import { expect } from 'chai';
import * as fs from 'node:fs';
import { createImage } from '../../src/disk/qcow/create';
import { openDiskImage } from '../../src/disk/open';
import { requireQemu, useTempDir, createImage as qemuCreate, qemuIo, run } from '../helpers/qemu';
import { makeOps, applyOps, qemuCompare } from './workload';

const SIZE = 4 << 20;

describe('qcow (version 1) read-write', function () {
  this.timeout(60000);
  const tmp = useTempDir('vblk-q1-');
  before(function () {
    requireQemu(this);
  });

  it('random writes, zeroes and discards on a new image match the mirror', async () => {
    const img = tmp.file('a.qcow');
    await createImage(img, { format: 'qcow', size: SIZE });
    const d = await openDiskImage(img);
    const mirror = new Uint8Array(SIZE);
    await applyOps(d, mirror, makeOps(31, 500, SIZE, 4096, { zero: true, discard: true }), { clusterSize: 4096, depth: 8 });
    await d.close();
    const c = qemuCompare(img, mirror, tmp.file('a.raw'), 'qcow');
    expect(c.status, c.out).to.equal(0);
  });

  it('an overlay over a raw backing file copies partial clusters from it', async () => {
    const base = tmp.file('base.raw');
    qemuCreate(base, SIZE, { format: 'raw' });
    qemuIo(base, ['write -P 0x3c 0 4M'], { format: 'raw' });
    const img = tmp.file('o.qcow');
    await createImage(img, { format: 'qcow', backingFile: base, backingFormat: 'raw' });
    const d = await openDiskImage(img);
    const mirror = new Uint8Array(fs.readFileSync(base));
    // qcow1 overlays use 512-byte clusters; with a backing file, discard leaves clusters alone
    // (qcow1 has no zero flag), so the mirror does not change.
    await applyOps(d, mirror, makeOps(32, 400, SIZE, 512, { zero: true, discard: true }), { clusterSize: 512, discardMirror: () => undefined });
    await d.close();
    const c = qemuCompare(img, mirror, tmp.file('o.raw'), 'qcow');
    expect(c.status, c.out).to.equal(0);
  });

  it('writes into compressed clusters decompress and copy them', async () => {
    const raw = tmp.file('c.raw');
    qemuCreate(raw, SIZE, { format: 'raw' });
    qemuIo(raw, ['write -P 0x21 0 2M', 'write -P 0x22 2M 2M'], { format: 'raw' });
    const img = tmp.file('c.qcow');
    run('qemu-img', ['convert', '-c', '-O', 'qcow', raw, img]); // exits 1 without a message (QEMU quirk), image complete
    expect(run('qemu-img', ['compare', '-F', 'raw', img, raw]).status).to.equal(0);
    const mirror = new Uint8Array(fs.readFileSync(raw));
    const d = await openDiskImage(img);
    await applyOps(d, mirror, makeOps(33, 300, SIZE, 4096, { zero: true }), { clusterSize: 4096 });
    await d.close();
    const c = qemuCompare(img, mirror, tmp.file('c2.raw'), 'qcow');
    expect(c.status, c.out).to.equal(0);
    qemuIo(img, ['read 0 4M'], { format: 'qcow' });
  });
});
