/**
 * Behaviour of the qcow2 read-write open beyond plain data: header bits (dirty, corrupt,
 * autoclear), read-only opens that must not write, range checks, concurrent requests, and the
 * create / io / convert commands.
 */
import { expect } from 'chai';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import { createImage } from '../../src/disk/qcow/create';
import { openDiskImage } from '../../src/disk/open';
import { openQcow2ReadWrite } from '../../src/disk/qcow/qcow2-rw';
import { FaultyFile } from '../../src/disk/faulty-file';
import { NodeImageFile } from '../../src/disk/file';
import { main } from '../../src/cli/main';
import { requireQemu, useTempDir, createImage as qemuCreate, qemuIo, qemuImg, pokeBytes, be64, run, readBytes } from '../helpers/qemu';
import { qemuCheck } from './workload';

function incompat(img: string): bigint {
  return readBytes(img, 72, 8).readBigUInt64BE(0);
}

async function vblk(args: string[]): Promise<{ status: number; out: string }> {
  let out = '';
  const w = { write: (s: string) => (out += s) };
  const status = await main(args, { stdout: w, stderr: w });
  return { status, out };
}

async function rejectsWith(p: Promise<unknown>, code: string): Promise<void> {
  let err: unknown;
  try {
    await p;
  } catch (e) {
    err = e;
  }
  expect(err, `expected a rejection with ${code}`).to.have.property('code', code);
}

describe('qcow2 read-write: header bits, read-only opens, ranges, concurrency', function () {
  this.timeout(60000);
  const tmp = useTempDir('vblk-rwb-');
  before(function () {
    requireQemu(this);
  });

  it('sets the dirty bit (lazy refcounts) before the first write and clears it at a clean close', async () => {
    const img = tmp.file('lazy.qcow2');
    await createImage(img, { format: 'qcow2', size: 1 << 20, lazyRefcounts: true });
    const d = await openDiskImage(img);
    expect(incompat(img) & 1n, 'not dirty before any write').to.equal(0n);
    await d.writeSector(0, new Uint8Array(512).fill(1));
    expect(incompat(img) & 1n, 'dirty while open for writing').to.equal(1n);
    await d.close();
    expect(incompat(img) & 1n).to.equal(0n);
    expect(qemuCheck(img).status).to.equal(0);
  });

  it('repairs an image left dirty by a crash (qemu-io killed) when opened read-write', async () => {
    const img = tmp.file('dirty.qcow2');
    qemuCreate(img, '1M', { options: { lazy_refcounts: 'on' } });
    run('qemu-io', ['-c', 'write -P 0x5a 0 512', '-c', 'sigraise 9', img]);
    expect(incompat(img) & 1n).to.equal(1n);
    expect(qemuCheck(img).status, 'stale refcounts').to.equal(2);
    const d = await openDiskImage(img);
    await d.writeSector(8, new Uint8Array(512).fill(0x6b));
    await d.close();
    expect(incompat(img) & 1n).to.equal(0n);
    const c = qemuCheck(img);
    expect(c.status, c.out).to.equal(0);
    qemuIo(img, ['read -P 0x5a 0 512', 'read -P 0x6b 4096 512']);
  });

  it('repairs a dirty image left by a vblk crash mid-workload', async () => {
    const img = tmp.file('dirty2.qcow2');
    await createImage(img, { format: 'qcow2', size: 1 << 20, lazyRefcounts: true, clusterSize: 4096 });
    const f = new FaultyFile(await NodeImageFile.open(img, { writable: true }), { crashAfterWrite: 6 });
    const d = await openQcow2ReadWrite(f, { path: img });
    for (let i = 0; i < 20; i++) await d.writeSector(i * 16, new Uint8Array(4096).fill(i + 1));
    await d.close();
    expect(incompat(img) & 1n, 'the crash left the bit set').to.equal(1n);
    const again = await openDiskImage(img);
    await again.close();
    expect(incompat(img) & 1n).to.equal(0n);
    expect(qemuCheck(img).status).to.be.oneOf([0]);
  });

  it('refuses a read-write open of an image marked corrupt, but opens it read-only', async () => {
    const img = tmp.file('corrupt.qcow2');
    await createImage(img, { format: 'qcow2', size: 1 << 20 });
    pokeBytes(img, 72, be64(2n));
    await rejectsWith(openDiskImage(img), 'E_QCOW_CORRUPT');
    const ro = await openDiskImage(img, { readonly: true });
    await ro.readSector(0, new Uint8Array(512));
    await ro.close();
  });

  it('refuses a write through an L2 entry that aliases the L1 table and marks the image corrupt', async () => {
    const img = tmp.file('alias.qcow2');
    qemuCreate(img, '1M');
    qemuIo(img, ['write -P 0x11 0 64k']);
    pokeBytes(img, 0x40000, be64(0x8000000000030000n)); // L2 entry 0 -> the L1 table's cluster
    const l1Before = readBytes(img, 0x30000, 8);
    const d = await openDiskImage(img);
    await rejectsWith(d.writeSector(0, new Uint8Array(512).fill(0xee)), 'E_QCOW_CORRUPT');
    await rejectsWith(d.writeSector(1024, new Uint8Array(512)), 'E_QCOW_CORRUPT');
    await d.close().catch(() => undefined);
    expect(readBytes(img, 0x30000, 8).equals(l1Before), 'the L1 table is untouched').to.equal(true);
    expect(incompat(img) & 2n, 'corrupt bit set').to.equal(2n);
    await rejectsWith(openDiskImage(img), 'E_QCOW_CORRUPT');
  });

  it('clears unknown autoclear bits before the first write', async () => {
    const img = tmp.file('autoclear.qcow2');
    await createImage(img, { format: 'qcow2', size: 1 << 20 });
    pokeBytes(img, 88, be64(0x21n));
    const d = await openDiskImage(img);
    await d.writeSector(0, new Uint8Array(512).fill(3));
    expect(readBytes(img, 88, 8).readBigUInt64BE(0)).to.equal(0n);
    await d.close();
    expect(qemuCheck(img).status).to.equal(0);
  });

  it('never writes a byte when opened read-only (checksum and mtime unchanged)', async () => {
    const img = tmp.file('ro.qcow2');
    qemuCreate(img, '1M', { options: { lazy_refcounts: 'on' } });
    qemuIo(img, ['write -P 0x11 0 64k']);
    run('qemu-io', ['-c', 'write -P 0x22 64k 512', '-c', 'sigraise 9', img]); // dirty
    pokeBytes(img, 88, be64(0x10n)); // and an unknown autoclear bit
    const past = new Date(Date.now() - 3600_000);
    fs.utimesSync(img, past, past);
    const sum = (): string => crypto.createHash('sha256').update(fs.readFileSync(img)).digest('hex');
    const before = { sum: sum(), mtime: fs.statSync(img).mtimeMs };
    const d = await openDiskImage(img, { readonly: true });
    const buf = new Uint8Array(1 << 20);
    await d.readSector(0, buf);
    await rejectsWith(d.writeSector(0, new Uint8Array(512)), 'E_DISK_READONLY');
    await d.flush();
    await d.close();
    expect(buf[0]).to.equal(0x11);
    expect({ sum: sum(), mtime: fs.statSync(img).mtimeMs }).to.deep.equal(before);
  });

  it('rejects writes, zeroes and discards past the virtual size', async () => {
    const img = tmp.file('range.qcow2');
    await createImage(img, { format: 'qcow2', size: 1 << 20 });
    const d = await openDiskImage(img);
    await rejectsWith(d.writeSector(2048, new Uint8Array(512)), 'E_DISK_RANGE');
    await rejectsWith(d.writeSector(2047, new Uint8Array(1024)), 'E_DISK_RANGE');
    await rejectsWith(d.writeZeroes(2040, 16, false), 'E_DISK_RANGE');
    await rejectsWith(d.discard(2047, 2), 'E_DISK_RANGE');
    await d.close();
    expect(qemuCheck(img).status).to.equal(0);
  });

  it('runs many concurrent writes to the same and neighbouring clusters without double allocation or lost writes', async () => {
    for (const backing of [false, true]) {
      const img = tmp.file(`conc-${backing}.qcow2`);
      const cs = 4096;
      if (backing) {
        const base = tmp.file('conc-base.raw');
        qemuCreate(base, '1M', { format: 'raw' });
        qemuIo(base, ['write -P 0x99 0 1M'], { format: 'raw' });
        await createImage(img, { format: 'qcow2', clusterSize: cs, backingFile: base, backingFormat: 'raw' });
      } else {
        await createImage(img, { format: 'qcow2', size: 1 << 20, clusterSize: cs });
      }
      const d = await openDiskImage(img);
      // 3 clusters x 8 sectors, every sector written by its own request, all at once, twice over.
      const jobs: Promise<number>[] = [];
      for (let round = 0; round < 2; round++) {
        for (let s = 0; s < 24; s++) jobs.push(d.writeSector(s, new Uint8Array(512).fill(round * 100 + s + 1)));
      }
      await Promise.all(jobs);
      await d.flush();
      const buf = new Uint8Array(3 * cs + cs);
      await d.readSector(0, buf);
      await d.close();
      for (let s = 0; s < 24; s++) expect(buf[s * 512], `sector ${s}`).to.equal(100 + s + 1);
      expect(buf[3 * cs], 'untouched cluster').to.equal(backing ? 0x99 : 0);
      const c = qemuCheck(img);
      expect(c.status, c.out).to.equal(0);
      const map = JSON.parse(qemuImg('map', '--output=json', img)) as { start: number; length: number; depth: number; data: boolean }[];
      const own = map.filter((m) => m.depth === 0 && m.data).reduce((n, m) => n + m.length, 0);
      expect(own, 'exactly the three written clusters are allocated').to.equal(3 * cs);
    }
  });

  it('writes a request spanning host-contiguous allocated clusters with one file write', async () => {
    const img = tmp.file('contig.qcow2');
    qemuCreate(img, '1M', { options: { cluster_size: '4096' } });
    qemuIo(img, ['write -P 0x11 0 64k']); // 16 clusters, allocated in order
    const f = new FaultyFile(await NodeImageFile.open(img, { writable: true }));
    const d = await openQcow2ReadWrite(f, { path: img });
    await d.writeSector(0, new Uint8Array(512).fill(0x22)); // the first write prepares the image
    const before = f.writes;
    await d.writeSector(9, new Uint8Array(9 * 4096).fill(0x33)); // 4608 .. 41472: 10 clusters
    expect(f.writes - before).to.equal(1);
    await d.close();
    expect(qemuCheck(img).status).to.equal(0);
    qemuIo(img, ['read -P 0x22 0 512', 'read -P 0x11 512 4096', 'read -P 0x33 4608 36864', 'read -P 0x11 41472 24064']);
  });

  it('splits a request over clusters that are not all allocated in place, and the data is right', async () => {
    const img = tmp.file('split.qcow2');
    qemuCreate(img, '1M', { options: { cluster_size: '4096' } });
    qemuIo(img, ['write -P 0x11 0 16k', 'write -P 0x44 64k 4k']); // clusters 0-3, then 16 at host 4 clusters on
    const d = await openDiskImage(img);
    await d.writeSector(0, new Uint8Array(512).fill(0x22));
    await d.writeSector(16, new Uint8Array(6 * 4096).fill(0x55)); // clusters 2..7: 2-3 allocated, 4-7 new
    await d.writeSector(120, new Uint8Array(8192).fill(0x66)); // clusters 15..16: new, then allocated
    await d.close();
    expect(qemuCheck(img).status).to.equal(0);
    qemuIo(img, ['read -P 0x11 4096 4096', 'read -P 0x55 8192 24576', 'read -P 0x66 61440 8192']);
  });

  it('vblk create: qemu-img check is clean and qemu-img info reports the options given', async () => {
    const cases: { args: string[]; expect: RegExp[] }[] = [
      { args: ['-f', 'qcow2'], expect: [/cluster_size: 65536/, /compat: 1\.1/, /refcount bits: 16/, /lazy refcounts: false/] },
      { args: ['-f', 'qcow2', '-o', 'cluster_size=4k,compat=0.10'], expect: [/cluster_size: 4096/, /compat: 0\.10/] },
      { args: ['-f', 'qcow2', '-o', 'lazy_refcounts=on,refcount_bits=1,cluster_size=512'], expect: [/cluster_size: 512/, /lazy refcounts: true/, /refcount bits: 1$/m] },
      { args: ['-f', 'qcow2', '-o', 'preallocation=metadata,cluster_size=64k'], expect: [/disk size/] },
    ];
    for (const [i, c] of cases.entries()) {
      const img = tmp.file(`create${i}.qcow2`);
      const r = await vblk(['create', ...c.args, img, '8M']);
      expect(r.status, r.out).to.equal(0);
      expect(qemuCheck(img).status).to.equal(0);
      const info = qemuImg('info', img);
      expect(info).to.match(/virtual size: 8 MiB/);
      for (const re of c.expect) expect(info).to.match(re);
    }
    const pre = JSON.parse(qemuImg('map', '--output=json', tmp.file('create3.qcow2'))) as { data: boolean; length: number }[];
    expect(pre.every((m) => m.data), 'preallocation=metadata allocates every cluster').to.equal(true);
    const base = tmp.file('create0.qcow2');
    const top = tmp.file('create-top.qcow2');
    expect((await vblk(['create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top])).status).to.equal(0);
    const info = JSON.parse(qemuImg('info', '--output=json', top)) as Record<string, unknown>;
    expect(info).to.include({ 'backing-filename': base, 'backing-filename-format': 'qcow2', 'virtual-size': 8 << 20 });
    const raw = tmp.file('create.raw');
    expect((await vblk(['create', '-f', 'raw', raw, '3M'])).status).to.equal(0);
    expect(fs.statSync(raw).size).to.equal(3 << 20);
    const v1 = tmp.file('create.qcow');
    expect((await vblk(['create', '-f', 'qcow', v1, '1M'])).status).to.equal(0);
    expect(qemuImg('info', v1)).to.match(/file format: qcow\n/);
  });

  it('vblk io write / discard / flush and convert -O qcow2 produce what qemu-io reads back', async () => {
    const img = tmp.file('io.qcow2');
    await createImage(img, { format: 'qcow2', size: 4 << 20, clusterSize: 4096 });
    const r = await vblk(['io', '-c', 'write -P 0x41 1000 70000', '-c', 'write -z 65536 8192', '-c', 'write -P 0x42 1M 1M', '-c', 'discard 1M 512k', '-c', 'flush', img]);
    expect(r.status, r.out).to.equal(0);
    qemuIo(img, ['read -P 0x41 1000 64536', 'read -P 0 65536 8192', 'read -P 0 1M 512k', 'read -P 0x42 1536k 512k']);
    expect(qemuCheck(img).status).to.equal(0);
    const out = tmp.file('io-conv.qcow2');
    expect((await vblk(['convert', '-O', 'qcow2', '-o', 'cluster_size=512', img, out])).status).to.equal(0);
    expect(run('qemu-img', ['compare', img, out]).status).to.equal(0);
    expect(qemuCheck(out).status).to.equal(0);
    const map = JSON.parse(qemuImg('map', '--output=json', out)) as { start: number; length: number; data: boolean }[];
    const allocated = map.filter((m) => m.data).reduce((n, m) => n + m.length, 0);
    expect(allocated, 'zero ranges are not allocated').to.be.lessThan(2 << 20);
  });
});
