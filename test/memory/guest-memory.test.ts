import { expect } from 'chai';
import { GuestMemory, guestAddress, addressFromHalves } from '../../src/memory/guest-memory';
import { expectVblkError } from '../virtio/helpers';

function expectMemoryError(fn: () => unknown): void {
  expectVblkError(fn, 'E_VIRTIO_MEMORY');
}

describe('GuestMemory', () => {
  // Two adjacent regions [0x1000, 0x2000) and [0x2000, 0x3000), and one apart at 0x10000.
  function make(): { mem: GuestMemory; a: Buffer; b: Buffer; c: Buffer } {
    const a = Buffer.alloc(0x1000, 0xaa);
    const b = Buffer.alloc(0x1000, 0xbb);
    const c = Buffer.alloc(0x100, 0xcc);
    const mem = new GuestMemory([
      { guestAddr: 0x10000, buffer: c },
      { guestAddr: 0x2000, buffer: b },
      { guestAddr: 0x1000, buffer: a },
    ]);
    return { mem, a, b, c };
  }

  it('sorts regions and reports the total size', () => {
    const { mem } = make();
    expect(mem.regions.map((r) => r.guestAddr)).to.deep.equal([0x1000, 0x2000, 0x10000]);
    expect(mem.size).to.equal(0x2100);
  });

  it('rejects overlapping regions at construction', () => {
    expect(() => new GuestMemory([
      { guestAddr: 0x1000, buffer: Buffer.alloc(0x1000) },
      { guestAddr: 0x1fff, buffer: Buffer.alloc(0x10) },
    ])).to.throw(RangeError, /overlaps/);
  });

  it('rejects regions ending above 2^53 and negative addresses', () => {
    expect(() => new GuestMemory([{ guestAddr: Number.MAX_SAFE_INTEGER - 4, buffer: Buffer.alloc(16) }])).to.throw(RangeError);
    expect(() => new GuestMemory([{ guestAddr: -1, buffer: Buffer.alloc(16) }])).to.throw(RangeError);
  });

  it('slice() returns a zero-copy view aliasing the region buffer', () => {
    const { mem, a } = make();
    const v = mem.slice(0x1010, 4);
    v[0] = 0x11;
    expect(a[0x10]).to.equal(0x11);
    expect(v.buffer).to.equal(a.buffer);
  });

  it('slice() refuses a range crossing a region boundary and ranges outside memory', () => {
    const { mem } = make();
    expectMemoryError(() => mem.slice(0x1ffe, 4));
    expectMemoryError(() => mem.slice(0x3000, 1));
    expectMemoryError(() => mem.slice(0x0fff, 2));
    expectMemoryError(() => mem.slice(0x100ff, 2));
  });

  it('gather() splits a range across adjacent regions without copying', () => {
    const { mem, a, b } = make();
    const parts = mem.gather(0x1ffe, 4);
    expect(parts.map((p) => p.length)).to.deep.equal([2, 2]);
    expect(parts[0]?.buffer).to.equal(a.buffer);
    expect(parts[1]?.buffer).to.equal(b.buffer);
  });

  it('gather() refuses a range that runs into a hole', () => {
    const { mem } = make();
    expectMemoryError(() => mem.gather(0x2ff0, 0x20));
  });

  it('little-endian helpers read and write, also across a region boundary', () => {
    const { mem, a, b } = make();
    mem.writeU32(0x1ffe, 0x11223344);
    expect(a[0xffe]).to.equal(0x44);
    expect(a[0xfff]).to.equal(0x33);
    expect(b[0]).to.equal(0x22);
    expect(b[1]).to.equal(0x11);
    expect(mem.readU32(0x1ffe)).to.equal(0x11223344);
    mem.writeU16(0x2010, 0xbeef);
    expect(mem.readU16(0x2010)).to.equal(0xbeef);
    mem.writeU64(0x2020, 0x0102030405060708n);
    expect(mem.readU64(0x2020)).to.equal(0x0102030405060708n);
    mem.writeU8(0x10000, 7);
    expect(mem.readU8(0x10000)).to.equal(7);
  });

  it('readInto/writeFrom copy across regions and check the whole range before writing', () => {
    const { mem, a } = make();
    const src = Buffer.from([1, 2, 3, 4, 5, 6]);
    mem.writeFrom(0x1ffd, src);
    expect(mem.read(0x1ffd, 6)).to.deep.equal(src);
    const before = Buffer.from(a);
    expectMemoryError(() => mem.writeFrom(0x2ffe, src));
    expect(a.equals(before)).to.equal(true);
  });

  it('isValidRange() answers without throwing', () => {
    const { mem } = make();
    expect(mem.isValidRange(0x1000, 0x2000)).to.equal(true);
    expect(mem.isValidRange(0x1000, 0x2001)).to.equal(false);
    expect(mem.isValidRange(-1, 1)).to.equal(false);
    expect(mem.isValidRange(0x10000, 0x100)).to.equal(true);
  });

  it('zero-length accesses are valid anywhere and touch nothing', () => {
    const { mem } = make();
    expect(mem.slice(0xdead0000, 0).length).to.equal(0);
    expect(mem.gather(0xdead0000, 0)).to.deep.equal([]);
  });

  it('rejects non-integer and negative addresses', () => {
    const { mem } = make();
    expectMemoryError(() => mem.slice(4096.5, 1));
    expectMemoryError(() => mem.slice(-4, 1));
    expectMemoryError(() => mem.readU32(Number.MAX_SAFE_INTEGER + 2));
  });
});

describe('GuestMemory regions whose Buffers look ahead (one host mapping in several Buffers)', () => {
  // One 0x3000-byte "mapping" represented as three regions of 0x1000; the first two Buffers
  // reach 0x2000 bytes (into the next region), the last one only to the end.
  function make(): { mem: GuestMemory; host: Buffer } {
    const host = Buffer.alloc(0x3000);
    const mem = new GuestMemory([
      { guestAddr: 0x10000, length: 0x1000, buffer: host.subarray(0, 0x2000) },
      { guestAddr: 0x11000, length: 0x1000, buffer: host.subarray(0x1000, 0x3000) },
      { guestAddr: 0x12000, buffer: host.subarray(0x2000) },
    ]);
    return { mem, host };
  }

  it('counts each byte of guest memory once', () => {
    const { mem } = make();
    expect(mem.size).to.equal(0x3000);
    expect(mem.regions.map((r) => r.length)).to.deep.equal([0x1000, 0x1000, 0x1000]);
  });

  it('serves a range across a seam as one zero-copy view of the earlier region\'s Buffer', () => {
    const { mem, host } = make();
    const v = mem.slice(0x10ff0, 0x20);
    v.fill(0x5a);
    expect(host.subarray(0xff0, 0x1010).equals(Buffer.alloc(0x20, 0x5a))).to.equal(true);
    expect(mem.view(0x10ff0, 0x20)?.buffer).to.equal(host.buffer);
    expect(mem.regionIndex(0x10ff0, 0x20)).to.equal(0);
  });

  it('reads and writes a field across a seam through the look-ahead, not a copy', () => {
    const { mem, host } = make();
    mem.writeU64(0x11ffc, 0x0102030405060708n);
    expect(host.readBigUInt64LE(0x1ffc)).to.equal(0x0102030405060708n);
    expect(mem.readU64(0x11ffc)).to.equal(0x0102030405060708n);
  });

  it('gathers a range longer than one look-ahead in as few views as the Buffers allow', () => {
    const { mem } = make();
    expect(mem.gather(0x10800, 0x1000).map((p) => p.length)).to.deep.equal([0x1000]);
    expect(mem.gather(0x10800, 0x2000).map((p) => p.length)).to.deep.equal([0x1800, 0x800]);
    expect(Buffer.concat(mem.gather(0x10000, 0x3000)).length).to.equal(0x3000);
  });

  it('never reaches past the last region, look-ahead or not', () => {
    const { mem } = make();
    expect(mem.view(0x12ff0, 0x20)).to.equal(undefined);
    expect(mem.isValidRange(0x10000, 0x3001)).to.equal(false);
    expectMemoryError(() => mem.slice(0x12ff0, 0x20));
  });

  it('rejects a Buffer that looks ahead past the regions adjacent to it', () => {
    const host = Buffer.alloc(0x3000);
    expect(() => new GuestMemory([{ guestAddr: 0x10000, length: 0x1000, buffer: host.subarray(0, 0x2000) }])).to.throw(RangeError, /past the regions adjacent/);
    expect(() => new GuestMemory([
      { guestAddr: 0x10000, length: 0x1000, buffer: host.subarray(0, 0x2000) },
      { guestAddr: 0x11800, buffer: host.subarray(0x1800) },
    ])).to.throw(RangeError, /past the regions adjacent/);
  });

  it('rejects a length of zero or beyond the Buffer', () => {
    expect(() => new GuestMemory([{ guestAddr: 0x10000, length: 0, buffer: Buffer.alloc(16) }])).to.throw(RangeError, /length 0/);
    expect(() => new GuestMemory([{ guestAddr: 0x10000, length: 17, buffer: Buffer.alloc(16) }])).to.throw(RangeError, /length 17/);
  });
});

describe('guestAddress() / addressFromHalves()', () => {
  it('converts in-range u64 addresses to numbers', () => {
    expect(guestAddress(0x1234n, 16)).to.equal(0x1234);
    expect(addressFromHalves(0x5678, 0x12)).to.equal(0x12_0000_5678);
  });

  it('rejects addresses whose range wraps past 2^64', () => {
    expectMemoryError(() => guestAddress((1n << 64n) - 8n, 16));
  });

  it('rejects addresses above 2^53', () => {
    expectMemoryError(() => guestAddress(1n << 53n, 1));
    expect(addressFromHalves(0, 0x20_0000)).to.equal(-1);
    expect(addressFromHalves(0xffffffff, 0xffffffff)).to.equal(-1);
  });
});
