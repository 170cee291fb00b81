import { expect } from 'chai';
import { openDiskImage } from '../../src/disk/open';
import { Kind, openQcow2, type Qcow2State } from '../../src/disk/qcow/qcow2';
import { NodeImageFile, type ImageFile } from '../../src/disk/file';
import { DiskError } from '../../src/errors';
import { requireQemu, useTempDir, createImage, writePatterns, qemuIo, qemuImg } from '../helpers/qemu';

describe('Qcow2State (the object the write path builds on)', function () {
  const tmp = useTempDir();
  before(function () {
    requireQemu(this);
  });

  it('exposes header, L1 words, cache and file size, and lookup() classifies clusters', async () => {
    const f = createImage(tmp.file('k.qcow2'), '8M');
    writePatterns(f, [{ byte: 1, offset: 0, length: 65536 }, { byte: 2, offset: 65536, length: 65536 }]);
    qemuIo(f, ['write -z 65536 64k', 'write -z -u 0x20000 64k']);
    const d = await openDiskImage(f, { readonly: true });
    const s = d.priv as Qcow2State;
    expect(s.header.clusterBits).to.equal(16);
    expect(s.l1Size).to.equal(1);
    expect(s.l1.length).to.equal(2);
    expect(s.l2Offset(0)).to.equal(0x40000);
    expect(s.fileSize).to.be.greaterThan(0x50000);
    const data = await s.lookup(100);
    expect(data.kind).to.equal(Kind.Data);
    expect(data.host).to.equal(0x50000 + 100);
    expect(data.bytes).to.equal(65536 - 100);
    expect(data.l2Index).to.equal(0);
    expect((await s.lookup(65536)).kind).to.equal(Kind.Zero);
    expect((await s.lookup(65536)).host).to.equal(0x60000); // ZERO_ALLOC keeps its cluster
    expect((await s.lookup(0x20000)).kind).to.equal(Kind.Zero);
    expect((await s.lookup(0x20000)).host).to.equal(undefined); // ZERO_PLAIN
    const un = await s.lookup(0x30000);
    expect(un.kind).to.equal(Kind.Unallocated);
    expect(un.table?.offset).to.equal(0x40000);
    await d.close();
  });

  it('lookup() reports compressed entries and their extent', async () => {
    const src = createImage(tmp.file('c-src.qcow2'), '1M');
    writePatterns(src, [{ byte: 3, offset: 0, length: 65536 }]);
    qemuImg('convert', '-c', '-O', 'qcow2', src, tmp.file('c.qcow2'));
    const d = await openDiskImage(tmp.file('c.qcow2'), { readonly: true });
    const s = d.priv as Qcow2State;
    const m = await s.lookup(0);
    expect(m.kind).to.equal(Kind.Compressed);
    const ext = s.compressedExtent(m.entry ?? 0n);
    expect(ext.host).to.be.greaterThan(0);
    expect(ext.length).to.be.greaterThan(0).and.at.most(65536 + 512);
    await d.close();
  });
});

describe('read errors are never reported as success', function () {
  const tmp = useTempDir();
  before(function () {
    requireQemu(this);
  });

  it('an EIO from the host file rejects the request (kvmtool reported it as a full read)', async () => {
    const f = createImage(tmp.file('eio.qcow2'), '1M');
    writePatterns(f, [{ byte: 9, offset: 0, length: 65536 }]);
    const inner = await NodeImageFile.open(f, { writable: false });
    let failReads = false;
    const file: ImageFile = {
      path: inner.path,
      writable: false,
      read: (b: Uint8Array, o: number) => (failReads && o >= 0x50000 ? Promise.reject(new DiskError('E_DISK_IO', `Cannot read ${f}: EIO i/o error (injected)`)) : inner.read(b, o)),
      write: (b: Uint8Array, o: number) => inner.write(b, o),
      sync: () => inner.sync(),
      size: () => inner.size(),
      truncate: (n: number) => inner.truncate(n),
      close: () => inner.close(),
    };
    const d = await openQcow2(file, { path: f });
    failReads = true;
    let err: unknown;
    await d.readSector(0, new Uint8Array(4096)).catch((e: unknown) => (err = e));
    expect((err as { code?: string }).code).to.equal('E_DISK_IO');
    failReads = false;
    const buf = new Uint8Array(4096);
    await d.readSector(0, buf);
    expect(buf.every((b) => b === 9)).to.equal(true);
    await d.close();
  });
});
