import { expect } from 'chai';
import * as fs from 'node:fs';
import { FORMATS, openDiskImage, probeFormat } from '../../src/disk/open';
import { NodeImageFile } from '../../src/disk/file';
import { isVblkError } from '../../src/errors';
import type { Qcow2State } from '../../src/disk/qcow/qcow2';
import { requireQemu, useTempDir, createImage, writePatterns, qemuImg, pokeBytes, be64 } from '../helpers/qemu';

async function rejects(p: Promise<unknown>): Promise<Error & { code?: string }> {
  try {
    await p;
  } catch (e) {
    return e as Error & { code?: string };
  }
  throw new Error('expected a rejection');
}

describe('openDiskImage: probing and formats', function () {
  const tmp = useTempDir();
  before(function () {
    requireQemu(this);
  });

  it('probes qcow2 v3, v2, qcow1 and raw', async () => {
    const cases: [string, string][] = [
      [createImage(tmp.file('p3.qcow2'), '1M'), 'qcow2'],
      [createImage(tmp.file('p2.qcow2'), '1M', { options: { compat: '0.10' } }), 'qcow2'],
      [createImage(tmp.file('p1.qcow'), '1M', { format: 'qcow' }), 'qcow'],
      [createImage(tmp.file('p.raw'), '1M', { format: 'raw' }), 'raw'],
    ];
    for (const [f, fmt] of cases) {
      const d = await openDiskImage(f, { readonly: true });
      expect(d.format, f).to.equal(fmt);
      expect(d.size).to.equal(1 << 20);
      await d.close();
    }
  });

  it('a file shorter than the magic is raw', async () => {
    const f = tmp.file('tiny.raw');
    fs.writeFileSync(f, 'QFI');
    const file = await NodeImageFile.open(f, { writable: false });
    expect((await probeFormat(file)).format).to.equal('raw');
    await file.close();
  });

  it('format forces a format: qcow2 on a raw file is an error naming both', async () => {
    const f = createImage(tmp.file('f.raw'), '1M', { format: 'raw' });
    const e = await rejects(openDiskImage(f, { readonly: true, format: 'qcow2' }));
    expect(e.code).to.equal('E_FORMAT_UNKNOWN');
    expect(e.message).to.equal(`Cannot open ${f} as qcow2: it is not a qcow image (no QFI magic)`);
  });

  it('format qcow on a qcow2 file is an error', async () => {
    const f = createImage(tmp.file('f2.qcow2'), '1M');
    const e = await rejects(openDiskImage(f, { readonly: true, format: 'qcow' }));
    expect(e.message).to.equal(`Cannot open ${f} as qcow: it is a qcow2 image (version 3)`);
  });

  it('format raw on a qcow2 file reads the container bytes (explicit request)', async () => {
    const f = createImage(tmp.file('f3.qcow2'), '1M');
    const d = await openDiskImage(f, { readonly: true, format: 'raw' });
    const buf = new Uint8Array(512);
    await d.readSector(0, buf);
    expect(Buffer.from(buf.subarray(0, 4)).toString('latin1')).to.equal('QFI\xfb');
    await d.close();
  });

  it('opening read-write a format whose FORMATS entry has no read-write table fails clearly, naming the format', async () => {
    // Every format may have a read-write table by now, so take qcow's away for this test: the
    // refusal path must keep working for the next format that is added read-only first.
    const f = createImage(tmp.file('rw.qcow'), '1M', { format: 'qcow' });
    const saved = FORMATS.qcow;
    FORMATS.qcow = { readOnly: saved.readOnly };
    try {
      const e = await rejects(openDiskImage(f, { readonly: false }));
      expect(isVblkError(e, 'E_DISK_READONLY')).to.equal(true);
      expect(e.message).to.equal(`Cannot open ${f} read-write: writing qcow images is not supported yet; open it read-only`);
    } finally {
      FORMATS.qcow = saved;
    }
  });

  it('a missing file is E_DISK_IO naming it', async () => {
    const e = await rejects(openDiskImage(tmp.file('nope.qcow2'), { readonly: true }));
    expect(e.code).to.equal('E_DISK_IO');
    expect(e.message).to.equal(`Cannot open ${tmp.file('nope.qcow2')}: no such file`);
  });

  it('relative backing names resolve against the overlay folder, not the cwd', async () => {
    fs.mkdirSync(tmp.file('sub'));
    const base = createImage(tmp.file('sub/base.qcow2'), '1M');
    writePatterns(base, [{ byte: 0x7a, offset: 0, length: 4096 }]);
    const top = createImage(tmp.file('sub/top.qcow2'), undefined, { backing: 'base.qcow2', backingFormat: 'qcow2' });
    const d = await openDiskImage(top, { readonly: true });
    const buf = new Uint8Array(4096);
    await d.readSector(0, buf);
    expect(buf.every((b) => b === 0x7a)).to.equal(true);
    expect(d.describe().fullBackingFilename).to.equal(tmp.file('sub/base.qcow2'));
    await d.close();
  });

  it('a qcow image whose backing file name is empty opens without a backing file (as qemu-img)', async () => {
    const f = createImage(tmp.file('emptyname.qcow'), '1M', { format: 'qcow' });
    writePatterns(f, [{ byte: 0x5e, offset: 0, length: 512 }], 'qcow');
    pokeBytes(f, 8, be64(48n)); // backing_file_offset set, backing_file_size left at 0
    const d = await openDiskImage(f, { readonly: true });
    expect(d.describe().backingFile).to.equal(undefined);
    const buf = new Uint8Array(1024);
    await d.readSector(0, buf);
    expect(buf.subarray(0, 512).every((b) => b === 0x5e) && buf.subarray(512).every((b) => b === 0)).to.equal(true);
    await d.close();
  });

  it('a qcow image whose backing file name is stored far from the header still finds it (QEMU reads it anywhere)', async () => {
    const base = createImage(tmp.file('farbase.raw'), '1M', { format: 'raw' });
    fs.writeFileSync(base, Buffer.alloc(1 << 20, 0x3c));
    const f = createImage(tmp.file('farname.qcow'), undefined, { format: 'qcow', backing: 'farbase.raw', backingFormat: 'raw' });
    const at = fs.statSync(f).size + 4096; // past the first few KiB qemu-img writes
    pokeBytes(f, at, Buffer.from('farbase.raw'));
    pokeBytes(f, 8, be64(BigInt(at)));
    const d = await openDiskImage(f, { readonly: true });
    expect(d.describe().backingFile).to.equal('farbase.raw');
    const buf = new Uint8Array(512);
    await d.readSector(0, buf);
    expect(buf.every((b) => b === 0x3c)).to.equal(true);
    await d.close();
  });

  it('a chain of 10 images reads through every level', async () => {
    let prev = createImage(tmp.file('c0.qcow2'), '1M');
    writePatterns(prev, [{ byte: 0x40, offset: 0, length: 512 }]);
    for (let i = 1; i < 10; i++) {
      prev = createImage(tmp.file(`c${i}.qcow2`), undefined, { backing: `c${i - 1}.qcow2`, backingFormat: 'qcow2' });
      writePatterns(prev, [{ byte: 0x40 + i, offset: i * 512, length: 512 }]);
    }
    const d = await openDiskImage(prev, { readonly: true });
    const buf = new Uint8Array(5120);
    await d.readSector(0, buf);
    for (let i = 0; i < 10; i++) expect(buf[i * 512], `level ${i}`).to.equal(0x40 + i);
    await d.close();
  });

  it('closing an overlay closes its backing chain', async () => {
    const base = createImage(tmp.file('cb.qcow2'), '1M');
    const top = createImage(tmp.file('ct.qcow2'), undefined, { backing: 'cb.qcow2', backingFormat: 'qcow2' });
    void base;
    const d = await openDiskImage(top, { readonly: true });
    const backing = (d.priv as Qcow2State).backing;
    await d.close();
    expect(backing?.closed).to.equal(true);
    const e = await rejects(d.readSector(0, new Uint8Array(512)));
    expect(e.code).to.equal('E_DISK_CLOSED');
  });
});

describe('raw images', function () {
  const tmp = useTempDir();

  it('read-write: writes, flushes and reads back', async () => {
    const f = tmp.file('rw.raw');
    fs.writeFileSync(f, Buffer.alloc(1 << 20));
    const d = await openDiskImage(f, { readonly: false });
    expect(d.ops.name).to.equal('raw');
    await d.writeSector(8, new Uint8Array(4096).fill(0xab));
    await d.flush();
    const buf = new Uint8Array(4096);
    await d.readSector(8, buf);
    expect(buf.every((b) => b === 0xab)).to.equal(true);
    await d.writeZeroes(8, 4, false);
    await d.readSector(8, buf);
    expect(buf.subarray(0, 2048).every((b) => b === 0)).to.equal(true);
    expect(buf.subarray(2048).every((b) => b === 0xab)).to.equal(true);
    await d.close();
    expect(fs.readFileSync(f)[4096 + 2048]).to.equal(0xab);
  });

  it('read-only: rejects writes, discards and write-zeroes with E_DISK_READONLY', async () => {
    const f = tmp.file('ro.raw');
    fs.writeFileSync(f, Buffer.alloc(1 << 20, 1));
    const d = await openDiskImage(f, { readonly: true });
    expect(d.ops.name).to.equal('raw-ro');
    for (const p of [d.writeSector(0, new Uint8Array(512)), d.discard(0, 1), d.writeZeroes(0, 1, false)]) {
      const e = await rejects(p);
      expect(e.code).to.equal('E_DISK_READONLY');
    }
    // The table itself refuses too (for callers that bypass the DiskImage checks).
    const e = await rejects(d.ops.writeSector(d, 0, new Uint8Array(512)));
    expect(e.message).to.equal(`Cannot write ${f}: the image is open read-only`);
    await d.close();
    expect(fs.readFileSync(f).every((b) => b === 1)).to.equal(true);
  });

  it('a size that is not a multiple of 512 rounds up and the tail reads as zeroes (as qemu)', async () => {
    const f = tmp.file('odd.raw');
    fs.writeFileSync(f, Buffer.alloc(1000, 7));
    const d = await openDiskImage(f, { readonly: true });
    expect(d.size).to.equal(1024);
    const buf = new Uint8Array(1024).fill(9);
    await d.readSector(0, buf);
    expect(buf.subarray(0, 1000).every((b) => b === 7)).to.equal(true);
    expect(buf.subarray(1000).every((b) => b === 0)).to.equal(true);
    await d.close();
  });

  it('reports virtual size like qemu-img info', async function () {
    requireQemu(this);
    const f = tmp.file('odd2.raw');
    fs.writeFileSync(f, Buffer.alloc(1000000));
    const d = await openDiskImage(f, { readonly: true });
    expect(d.size).to.equal((JSON.parse(qemuImg('info', '--output=json', f)) as Record<string, number>)['virtual-size']);
    await d.close();
  });
});
