/**
 * The allocator's record of which clusters hold metadata follows the image both ways: a table
 * the L1 stops referencing, or a refcount table that moved, is no longer metadata once it is
 * freed, so reusing its cluster for data is a normal allocation, not a corruption.
 */
import { expect } from 'chai';
import { vblk } from '../cli/run-vblk';
import { requireQemu, useTempDir, createImage, qemuIo, qemuImg, readBytes, pokeBytes, be64 } from '../helpers/qemu';
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

  it('a refcount table that grows moves, and its old cluster is handed out again as data without a false overlap', async () => {
    const img = tmp.file('grown.qcow2');
    // 512-byte clusters of 64-bit refcounts: one table cluster covers 4096 clusters (2 MiB).
    createImage(img, '8M', { options: { cluster_size: '512', refcount_bits: '64' } });
    const oldTable = Number(readBytes(img, 48, 8).readBigUInt64BE(0));
    const r = await vblk('io', '-c', 'write -P 5 0 3M', '-c', 'flush', '-c', 'write -P 6 3M 64k', img);
    expect(r.status, r.stdout + r.stderr).to.equal(0);
    expect(Number(readBytes(img, 48, 8).readBigUInt64BE(0)), 'refcount_table_offset').to.not.equal(oldTable);
    const map = JSON.parse(qemuImg('map', '--output=json', img)) as { offset?: number }[];
    expect(map.some((e) => e.offset === oldTable), 'some guest data lives in the old table cluster').to.equal(true);
    const check = qemuCheck(img);
    expect(check.status, check.out).to.equal(0);
    qemuIo(img, ['read -P 5 0 3M', 'read -P 6 3M 64k'], { readonly: true });
  });
});
