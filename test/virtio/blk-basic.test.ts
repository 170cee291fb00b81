import { expect } from 'chai';
import { setup, pattern } from './helpers';
import { VIRTIO_BLK_T, VIRTIO_BLK_S, VIRTIO_BLK_F, BLK_CONFIG, decodeBlkConfig } from '../../src/virtio/blk-config';
import { VIRTIO_F } from '../../src/virtio/device';
import { encodeDwzSegment } from '../../src/virtio/mock-driver';

const bit = (b: bigint): bigint => 1n << b;

describe('VirtioBlkDevice basic requests through the mock driver', () => {
  it('IN reads the disk contents into the guest buffer', async () => {
    const { drv, disk } = setup();
    disk.priv.data.set(pattern(4096, 1), 8 * 512);
    const r = await drv.run(0, { type: VIRTIO_BLK_T.IN, sector: 8, readLen: 4096 });
    expect(r.status).to.equal(VIRTIO_BLK_S.OK);
    expect(r.data.equals(pattern(4096, 1))).to.equal(true);
    expect(r.usedLen).to.equal(4097);
  });

  it('OUT writes the guest data to the disk', async () => {
    const { drv, disk } = setup();
    const r = await drv.run(0, { type: VIRTIO_BLK_T.OUT, sector: 3, data: pattern(1024, 2) });
    expect(r.status).to.equal(VIRTIO_BLK_S.OK);
    expect(r.usedLen).to.equal(1);
    expect(disk.priv.data.subarray(3 * 512, 5 * 512).equals(pattern(1024, 2))).to.equal(true);
  });

  it('FLUSH reaches the disk and completes OK', async () => {
    const { drv, disk } = setup();
    const r = await drv.run(0, { type: VIRTIO_BLK_T.FLUSH, sector: 0 });
    expect(r.status).to.equal(VIRTIO_BLK_S.OK);
    expect(disk.priv.counts.flush).to.equal(1);
  });

  it('GET_ID returns the serial NUL-padded to 20 bytes, by default the image file name', async () => {
    const { drv } = setup();
    const r = await drv.run(0, { type: VIRTIO_BLK_T.GET_ID, sector: 0, readLen: 20 });
    expect(r.status).to.equal(VIRTIO_BLK_S.OK);
    expect(r.data.toString('latin1')).to.equal('test-disk.img\0\0\0\0\0\0\0');
  });

  it('GET_ID truncates a serial longer than 20 bytes', async () => {
    const { drv } = setup({ dev: { serial: 'a-very-long-serial-number-xyz' } });
    const r = await drv.run(0, { type: VIRTIO_BLK_T.GET_ID, sector: 0, readLen: 20 });
    expect(r.data.toString('latin1')).to.equal('a-very-long-serial-n');
  });

  it('GET_ID answers printable ASCII only (spec 5.2.6), whatever the serial holds', async () => {
    const { drv } = setup({ dev: { serial: 'disk-é\n1' } });
    const r = await drv.run(0, { type: VIRTIO_BLK_T.GET_ID, sector: 0, readLen: 20 });
    expect(r.data.toString('latin1')).to.equal('disk-__1\0\0\0\0\0\0\0\0\0\0\0\0');
  });

  it('accepts an OUT whose header and data are cut at odd offsets across descriptors', async () => {
    const { drv, disk } = setup();
    const data = pattern(2048, 3);
    // header split 5/11, data glued to the header tail and cut at odd offsets
    const w = await drv.run(0, { type: VIRTIO_BLK_T.OUT, sector: 10, data }, { readableCuts: [5, 100, 1500] });
    expect(w.status).to.equal(VIRTIO_BLK_S.OK);
    expect(disk.priv.data.subarray(10 * 512, 14 * 512).equals(data)).to.equal(true);
  });

  it('accepts an IN whose data is cut at odd offsets and shares a descriptor with the status', async () => {
    const { drv, disk } = setup();
    disk.priv.data.set(pattern(2048, 3), 10 * 512);
    const r = await drv.run(0, { type: VIRTIO_BLK_T.IN, sector: 10, readLen: 2048 }, { writableCuts: [7, 1000] });
    expect(r.status).to.equal(VIRTIO_BLK_S.OK);
    expect(r.data.equals(pattern(2048, 3))).to.equal(true);
  });

  it('accepts an IN whose data and status are one descriptor', async () => {
    const { drv, disk } = setup();
    disk.priv.data.set(pattern(2048, 3), 10 * 512);
    const r = await drv.run(0, { type: VIRTIO_BLK_T.IN, sector: 10, readLen: 2048 }, { writableCuts: [] });
    expect(r.status).to.equal(VIRTIO_BLK_S.OK);
    expect(r.data.equals(pattern(2048, 3))).to.equal(true);
  });

  it('writes through an indirect descriptor table', async () => {
    const { drv, disk } = setup();
    const data = pattern(4096, 4);
    const w = await drv.run(0, { type: VIRTIO_BLK_T.OUT, sector: 0, data }, { indirect: true, readableCuts: [16, 512, 4000] });
    expect(w.status).to.equal(VIRTIO_BLK_S.OK);
    expect(disk.priv.data.subarray(0, 4096).equals(data)).to.equal(true);
  });

  it('reads through an indirect descriptor table', async () => {
    const { drv, disk } = setup();
    disk.priv.data.set(pattern(4096, 4), 0);
    const r = await drv.run(0, { type: VIRTIO_BLK_T.IN, sector: 0, readLen: 4096 }, { indirect: true, writableCuts: [512, 1024, 4096] });
    expect(r.status).to.equal(VIRTIO_BLK_S.OK);
    expect(r.data.equals(pattern(4096, 4))).to.equal(true);
  });

  it('serves several queues independently', async () => {
    const { drv, disk } = setup({ dev: { numQueues: 3 } });
    const rs = await Promise.all([0, 1, 2].map((q) => drv.run(q, { type: VIRTIO_BLK_T.OUT, sector: q * 8, data: pattern(4096, 10 + q) })));
    expect(rs.map((r) => r.status)).to.deep.equal([0, 0, 0]);
    for (const q of [0, 1, 2]) expect(disk.priv.data.subarray(q * 4096, q * 4096 + 4096).equals(pattern(4096, 10 + q))).to.equal(true);
  });

  it('completes many in-flight requests out of order', async () => {
    const { drv, disk } = setup({ disk: { maxDelayTurns: 8 } });
    disk.priv.data.set(pattern(16 * 4096, 5), 0);
    const subs = Array.from({ length: 14 }, (_, i) => drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: i * 8, readLen: 4096 }, { indirect: true }));
    drv.kick(0);
    const done = await drv.complete(subs);
    done.forEach((r, i) => {
      expect(r.status).to.equal(VIRTIO_BLK_S.OK);
      expect(r.data.equals(pattern(16 * 4096, 5).subarray(i * 4096, i * 4096 + 4096))).to.equal(true);
    });
  });

  it('offers the documented features', () => {
    const { dev } = setup({ start: false, dev: { numQueues: 2, readonly: true } });
    const f = dev.deviceFeatures;
    for (const b of [VIRTIO_F.VERSION_1, VIRTIO_F.INDIRECT_DESC, VIRTIO_F.EVENT_IDX, VIRTIO_BLK_F.SEG_MAX, VIRTIO_BLK_F.SIZE_MAX, VIRTIO_BLK_F.BLK_SIZE, VIRTIO_BLK_F.FLUSH, VIRTIO_BLK_F.CONFIG_WCE, VIRTIO_BLK_F.TOPOLOGY, VIRTIO_BLK_F.RO, VIRTIO_BLK_F.MQ, VIRTIO_BLK_F.DISCARD, VIRTIO_BLK_F.WRITE_ZEROES]) {
      expect((f & bit(b)) !== 0n, `bit ${b}`).to.equal(true);
    }
  });

  it('refuses a feature it did not offer', () => {
    const { dev } = setup({ start: false });
    expect(dev.setDriverFeatures(dev.deviceFeatures | bit(VIRTIO_F.RING_PACKED))).to.equal(false);
    expect(dev.driverFeatures).to.equal(0n);
  });

  it('refuses features without VERSION_1 (only the modern interface exists)', () => {
    const { dev } = setup({ start: false });
    expect(dev.setDriverFeatures(bit(VIRTIO_BLK_F.FLUSH))).to.equal(false);
  });

  it('accepts any offered subset that includes VERSION_1', () => {
    const { dev } = setup({ start: false });
    expect(dev.setDriverFeatures(bit(VIRTIO_F.VERSION_1) | bit(VIRTIO_BLK_F.FLUSH))).to.equal(true);
    expect(dev.driverFeatures).to.equal(bit(VIRTIO_F.VERSION_1) | bit(VIRTIO_BLK_F.FLUSH));
  });

  it('does not offer RO, MQ or DISCARD when they do not apply', () => {
    const { dev } = setup({ start: false, disk: { discard: false } });
    expect(dev.deviceFeatures & bit(VIRTIO_BLK_F.RO)).to.equal(0n);
    expect(dev.deviceFeatures & bit(VIRTIO_BLK_F.MQ)).to.equal(0n);
    expect(dev.deviceFeatures & bit(VIRTIO_BLK_F.DISCARD)).to.equal(0n);
  });

  it('exposes every config space field', () => {
    const { dev } = setup({ start: false, dev: { numQueues: 4, queueSize: 128 } });
    const raw = new Uint8Array(BLK_CONFIG.size + 8);
    dev.readConfig(0, raw);
    const c = decodeBlkConfig(raw);
    expect(c).to.deep.equal({
      capacity: 2048,
      sizeMax: 1 << 20,
      segMax: 126,
      blkSize: 512,
      physicalBlockExp: 0,
      alignmentOffset: 0,
      minIoSize: 1,
      optIoSize: 0,
      writeback: 1,
      numQueues: 4,
      maxDiscardSectors: 1 << 22,
      maxDiscardSeg: 32,
      discardSectorAlignment: 1,
      maxWriteZeroesSectors: 1 << 22,
      maxWriteZeroesSeg: 32,
      writeZeroesMayUnmap: 1,
    });
    expect(Array.from(raw.subarray(BLK_CONFIG.size))).to.deep.equal([0, 0, 0, 0, 0, 0, 0, 0]);
    const part = new Uint8Array(2);
    dev.readConfig(BLK_CONFIG.numQueues, part);
    expect(Array.from(part)).to.deep.equal([4, 0]);
  });

  it('writethrough (writeback=0 via CONFIG_WCE) flushes after each write before completing', async () => {
    const { drv, dev, disk } = setup();
    dev.writeConfig(BLK_CONFIG.writeback, Uint8Array.of(0));
    expect(dev.writeback).to.equal(0);
    const r = await drv.run(0, { type: VIRTIO_BLK_T.OUT, sector: 0, data: pattern(512, 6) });
    expect(r.status).to.equal(VIRTIO_BLK_S.OK);
    expect(disk.priv.counts.flush).to.equal(1);
  });

  it('writeback (writeback=1 via CONFIG_WCE) completes writes without a flush', async () => {
    const { drv, dev, disk } = setup({ dev: { writeback: false } });
    dev.writeConfig(BLK_CONFIG.writeback, Uint8Array.of(1));
    await drv.run(0, { type: VIRTIO_BLK_T.OUT, sector: 0, data: pattern(512, 6) });
    expect(disk.priv.counts.flush).to.equal(0);
  });

  it('ignores writes to writeback when CONFIG_WCE was not negotiated', () => {
    const { dev } = setup({ drv: { features: bit(VIRTIO_F.VERSION_1) | bit(VIRTIO_BLK_F.FLUSH) } });
    dev.writeConfig(BLK_CONFIG.writeback, Uint8Array.of(0));
    expect(dev.writeback).to.equal(1);
  });

  it('ignores writes to read-only config fields', () => {
    const { dev } = setup();
    const before = new Uint8Array(BLK_CONFIG.size);
    dev.readConfig(0, before);
    dev.writeConfig(BLK_CONFIG.capacity, new Uint8Array(8).fill(0xff));
    const after = new Uint8Array(BLK_CONFIG.size);
    dev.readConfig(0, after);
    expect(Array.from(after)).to.deep.equal(Array.from(before));
  });

  it('starts in writethrough with writeback = 0 when CONFIG_WCE is negotiated without FLUSH (spec 5.2.5)', async () => {
    const s = setup({ drv: { features: bit(VIRTIO_F.VERSION_1) | bit(VIRTIO_BLK_F.CONFIG_WCE) } });
    expect([s.dev.writethrough, s.dev.writeback]).to.deep.equal([true, 0]);
    await s.drv.run(0, { type: VIRTIO_BLK_T.OUT, sector: 0, data: pattern(512, 7) });
    expect(s.disk.priv.counts.flush).to.equal(1);
  });

  it('is in writeback when FLUSH is negotiated and the default mode is kept', () => {
    const { dev } = setup();
    expect(dev.writethrough).to.equal(false);
  });

  it('DISCARD zeroes the range of every segment and nothing else', async () => {
    const { drv, disk } = setup();
    disk.priv.data.fill(0x55);
    const segs = Buffer.concat([encodeDwzSegment(0, 2, 0), encodeDwzSegment(10, 1, 0)]);
    const d = await drv.run(0, { type: VIRTIO_BLK_T.DISCARD, sector: 0, data: segs });
    expect(d.status).to.equal(VIRTIO_BLK_S.OK);
    expect(disk.priv.data.subarray(0, 1024).every((b) => b === 0)).to.equal(true);
    expect(disk.priv.data[1024]).to.equal(0x55);
    expect(disk.priv.data.subarray(5120, 5632).every((b) => b === 0)).to.equal(true);
    expect(disk.priv.data[5632]).to.equal(0x55);
  });

  it('WRITE_ZEROES with the unmap flag zeroes its range and nothing else', async () => {
    const { drv, disk } = setup();
    disk.priv.data.fill(0x55);
    const z = await drv.run(0, { type: VIRTIO_BLK_T.WRITE_ZEROES, sector: 0, data: encodeDwzSegment(20, 4, 1) });
    expect(z.status).to.equal(VIRTIO_BLK_S.OK);
    expect(disk.priv.data.subarray(20 * 512, 24 * 512).every((b) => b === 0)).to.equal(true);
    expect([disk.priv.data[20 * 512 - 1], disk.priv.data[24 * 512]]).to.deep.equal([0x55, 0x55]);
  });

  it('accepts an indirect chain of seg_max data buffers on a queue smaller than the maximum', async () => {
    // Linux sizes indirect tables from seg_max (= max queue size - 2), not from the queue size it picked.
    const { drv, disk, dev } = setup({ dev: { queueSize: 64 }, drv: { queueSize: 16 } });
    expect(dev.segMax).to.equal(62);
    disk.priv.data.set(pattern(62 * 512, 8), 0);
    const cuts = Array.from({ length: 62 }, (_, i) => (i + 1) * 512);
    const r = await drv.run(0, { type: VIRTIO_BLK_T.IN, sector: 0, readLen: 62 * 512 }, { indirect: true, writableCuts: cuts });
    expect(r.status).to.equal(VIRTIO_BLK_S.OK);
    expect(r.data.equals(pattern(62 * 512, 8))).to.equal(true);
  });

  it('GET_ID into a buffer shorter than 20 bytes writes only what fits', async () => {
    const { drv } = setup({ dev: { serial: 'ABCDEFGHIJ' } });
    const r = await drv.run(0, { type: VIRTIO_BLK_T.GET_ID, sector: 0, readLen: 4 });
    expect(r.status).to.equal(VIRTIO_BLK_S.OK);
    expect(r.data.toString('latin1')).to.equal('ABCD');
    expect(r.usedLen).to.equal(5);
  });

  it('GET_ID into a buffer longer than 20 bytes NUL-pads all of it (every byte the used length covers is written)', async () => {
    const { drv } = setup({ dev: { serial: 'ABCDEFGHIJ' } });
    const r = await drv.run(0, { type: VIRTIO_BLK_T.GET_ID, sector: 0, readLen: 64 }, { writableCuts: [7, 30] });
    expect(r.status).to.equal(VIRTIO_BLK_S.OK);
    expect(r.usedLen).to.equal(65);
    expect(r.data.equals(Buffer.concat([Buffer.from('ABCDEFGHIJ', 'latin1'), Buffer.alloc(54)]))).to.equal(true);
  });

  it('a disk I/O error becomes IOERR and the queue keeps serving', async () => {
    const { drv } = setup({ disk: { fail: (op, sector) => op === 'read' && sector === 100 } });
    const bad = await drv.run(0, { type: VIRTIO_BLK_T.IN, sector: 100, readLen: 512 });
    expect(bad.status).to.equal(VIRTIO_BLK_S.IOERR);
    const ok = await drv.run(0, { type: VIRTIO_BLK_T.IN, sector: 101, readLen: 512 });
    expect(ok.status).to.equal(VIRTIO_BLK_S.OK);
  });
});
