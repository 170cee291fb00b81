/**
 * The allocator's record of which clusters hold metadata follows the image both ways: a table
 * the L1 stops referencing is no longer metadata once it is freed, so reusing its cluster for
 * data is a normal allocation, not a corruption.
 */
import { expect } from 'chai';
import { vblk } from '../cli/run-vblk';
import { requireQemu, useTempDir, createImage, qemuIo, readBytes, pokeBytes, be64 } from '../helpers/qemu';
import { qemuCheck } from './workload';

/** Clears OFLAG_COPIED (bit 63) of L1 entry `i`, as an image qemu-img check reports with an OFLAG_COPIED error. */
function clearL1Copied(img: string, i: number): void {
  const l1 = Number(readBytes(img, 40, 8).readBigUInt64BE(0));
  const entry = readBytes(img, l1 + i * 8, 8).readBigUInt64BE(0);
  pokeBytes(img, l1 + i * 8, be64(entry & ~(1n << 63n)));
}

describe('qcow2 read-write: metadata bookkeeping', function () {
  this.timeout(60000);
  const tmp = useTempDir('vblk-meta-');
  before(function () {
    requireQemu(this);
  });

  it('an L2 table copied away from an L1 entry without COPIED frees its cluster, and reusing it for data is not corruption', async () => {
    const img = tmp.file('copied.qcow2');
    createImage(img, '64M');
    qemuIo(img, ['write -P 1 0 4M']);
    clearL1Copied(img, 0);
    const r = await vblk('io', '-c', 'write -P 3 4M 64k', '-c', 'flush', '-c', 'write -P 4 8M 1M', img);
    expect(r.status, r.stdout + r.stderr).to.equal(0);
    expect(r.stdout + r.stderr).to.not.match(/corrupt/);
    const check = qemuCheck(img);
    expect(check.status, check.out).to.equal(0);
    qemuIo(img, ['read -P 1 0 4M', 'read -P 3 4M 64k', 'read -P 4 8M 1M', 'read -P 0 9M 1M'], { readonly: true });
  });
});
