import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'chai';
import { isVblkError } from '../../src/errors';
import { close, eventfd, ioctl, mmap, munmap, open, MAP_SHARED, O_RDONLY, O_RDWR, PROT_READ, PROT_WRITE } from '../../src/native/libc';
import { requireNativeLibrary } from '../helpers/skip';

describe('native libc bindings', function () {
  before(function () {
    requireNativeLibrary(this);
  });

  it('mmap() returns a zero-filled anonymous mapping exposed as a writable Buffer', function () {
    const m = mmap({ length: 8192 });
    try {
      expect(m.buffer.length).to.equal(8192);
      expect(m.address > 0n).to.equal(true);
      expect(m.buffer.every((b) => b === 0)).to.equal(true);
      m.buffer.writeUInt32LE(0xdeadbeef, 4096);
      expect(m.buffer.readUInt32LE(4096)).to.equal(0xdeadbeef);
    } finally {
      munmap(m);
    }
  });

  it('mmap() of a file with MAP_SHARED shows writes through the Buffer in the file (zero copy)', function () {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vblk-native-'));
    try {
      const file = path.join(dir, 'f');
      fs.writeFileSync(file, Buffer.alloc(4096, 0x11));
      const fd = open(file, O_RDWR);
      try {
        const m = mmap({ length: 4096, fd, prot: PROT_READ | PROT_WRITE, flags: MAP_SHARED });
        expect(m.buffer[100]).to.equal(0x11);
        m.buffer[100] = 0x22;
        munmap(m);
      } finally {
        close(fd);
      }
      expect(fs.readFileSync(file)[100]).to.equal(0x22);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('open() of a missing file throws E_NATIVE naming the errno', function () {
    let err: unknown;
    try {
      open('/nonexistent/vblk', O_RDONLY);
    } catch (e) {
      err = e;
    }
    expect(isVblkError(err, 'E_NATIVE')).to.equal(true);
    expect((err as Error).message).to.equal('Cannot open /nonexistent/vblk: ENOENT');
  });

  it('ioctl() on a bad fd reports EBADF with the request name', function () {
    expect(() => ioctl(-1, 0xae00, 0, 'KVM_GET_API_VERSION')).to.throw('Cannot KVM_GET_API_VERSION: EBADF');
  });

  it('eventfd() counters are readable and writable with fs', function () {
    const fd = eventfd(0);
    try {
      const v = Buffer.alloc(8);
      v.writeBigUInt64LE(3n);
      fs.writeSync(fd, v);
      fs.writeSync(fd, v);
      const out = Buffer.alloc(8);
      expect(fs.readSync(fd, out)).to.equal(8);
      expect(out.readBigUInt64LE()).to.equal(6n);
    } finally {
      close(fd);
    }
  });
});
