import { expect } from 'chai';
import fc from 'fast-check';
import { createMemoryDisk } from '../../src/disk/memory-disk';
import { VirtioError } from '../../src/errors';
import { GuestMemory } from '../../src/memory/guest-memory';
import { MMIO_INT, MMIO_MAGIC, MMIO_REG, MMIO_VENDOR_ID, VirtioMmioTransport } from '../../src/transport/mmio';
import { VIRTIO_BLK_S, VIRTIO_BLK_T } from '../../src/virtio/blk-config';
import { VirtioBlkDevice } from '../../src/virtio/blk';
import { VIRTIO_STATUS as S, type QueueStart, type VirtioDevice } from '../../src/virtio/device';
import { MockBlkDriver, MockVirtqueue } from '../../src/virtio/mock-driver';

const VERSION_1 = 1n << 32n;

/** A device that records what the transport asks of it. */
class FakeDevice implements VirtioDevice {
  readonly deviceType = 2;
  readonly numQueues = 2;
  readonly maxQueueSize = 64;
  readonly deviceFeatures = VERSION_1 | (1n << 9n) | (1n << 5n);
  driverFeatures = 0n;
  configGeneration = 7;
  needsReset = false;
  config = Buffer.from([...Array(0x60).keys()]);
  started: { index: number; q: QueueStart }[] = [];
  stopped: number[] = [];
  notified: number[] = [];
  resets = 0;
  configWrites: { offset: number; data: number[] }[] = [];
  #configCb: (() => void) | undefined;

  setDriverFeatures(features: bigint): boolean {
    if ((features & ~this.deviceFeatures) !== 0n) return false;
    this.driverFeatures = features;
    return true;
  }
  readConfig(offset: number, out: Uint8Array): void {
    for (let i = 0; i < out.length; i++) out[i] = this.config[offset + i] ?? 0;
  }
  writeConfig(offset: number, data: Uint8Array): void {
    this.configWrites.push({ offset, data: [...data] });
  }
  startQueue(index: number, q: QueueStart): void {
    if (!q.memory.isValidRange(q.descTable, 16 * q.size)) throw new VirtioError('E_VIRTIO_RING', `Cannot start queue ${index}: descriptor table outside guest memory`);
    this.started.push({ index, q });
  }
  stopQueue(index: number): Promise<number> {
    this.stopped.push(index);
    return Promise.resolve(0);
  }
  queueNotify(index: number): void {
    this.notified.push(index);
  }
  async reset(): Promise<void> {
    await new Promise((r) => setImmediate(r));
    this.resets++;
    this.driverFeatures = 0n;
    this.needsReset = false;
  }
  onConfigChange(cb: () => void): void {
    this.#configCb = cb;
  }
  fireConfigChange(): void {
    this.#configCb?.();
  }
}

function setup(): { dev: FakeDevice; mmio: VirtioMmioTransport; irqs: { n: number } } {
  const dev = new FakeDevice();
  const memory = new GuestMemory([{ guestAddr: 0, buffer: Buffer.alloc(1 << 16) }]);
  const irqs = { n: 0 };
  const mmio = new VirtioMmioTransport({ device: dev, memory, raiseInterrupt: () => irqs.n++ });
  return { dev, mmio, irqs };
}

/** Driver steps up to FEATURES_OK with `features`. */
function negotiate(mmio: VirtioMmioTransport, features: bigint): void {
  mmio.write(MMIO_REG.STATUS, S.ACKNOWLEDGE);
  mmio.write(MMIO_REG.STATUS, S.ACKNOWLEDGE | S.DRIVER);
  mmio.write(MMIO_REG.DRIVER_FEATURES_SEL, 0);
  mmio.write(MMIO_REG.DRIVER_FEATURES, Number(features & 0xffffffffn));
  mmio.write(MMIO_REG.DRIVER_FEATURES_SEL, 1);
  mmio.write(MMIO_REG.DRIVER_FEATURES, Number(features >> 32n));
  mmio.write(MMIO_REG.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
}

function setQueue(mmio: VirtioMmioTransport, index: number, size: number, desc: number, avail: number, used: number): void {
  mmio.write(MMIO_REG.QUEUE_SEL, index);
  mmio.write(MMIO_REG.QUEUE_NUM, size);
  mmio.write(MMIO_REG.QUEUE_DESC_LOW, desc % 2 ** 32);
  mmio.write(MMIO_REG.QUEUE_DESC_HIGH, Math.floor(desc / 2 ** 32));
  mmio.write(MMIO_REG.QUEUE_DRIVER_LOW, avail % 2 ** 32);
  mmio.write(MMIO_REG.QUEUE_DRIVER_HIGH, Math.floor(avail / 2 ** 32));
  mmio.write(MMIO_REG.QUEUE_DEVICE_LOW, used % 2 ** 32);
  mmio.write(MMIO_REG.QUEUE_DEVICE_HIGH, Math.floor(used / 2 ** 32));
  mmio.write(MMIO_REG.QUEUE_READY, 1);
}

describe('virtio-mmio v2 register model (src/transport/mmio.ts)', function () {
  describe('identification', function () {
    it('reads magic "virt", version 2, the device id and the vendor id', function () {
      const { mmio } = setup();
      expect([MMIO_REG.MAGIC_VALUE, MMIO_REG.VERSION, MMIO_REG.DEVICE_ID, MMIO_REG.VENDOR_ID].map((o) => mmio.read(o))).to.deep.equal([
        MMIO_MAGIC,
        2,
        2,
        MMIO_VENDOR_ID,
      ]);
    });

    it('DeviceFeatures shows the low word for select 0, the high word for 1, and 0 beyond', function () {
      const { mmio, dev } = setup();
      const words = [0, 1, 2].map((sel) => {
        mmio.write(MMIO_REG.DEVICE_FEATURES_SEL, sel);
        return mmio.read(MMIO_REG.DEVICE_FEATURES);
      });
      expect(words).to.deep.equal([Number(dev.deviceFeatures & 0xffffffffn), 1, 0]);
    });

    it('QueueNumMax is the device maximum for an existing queue and 0 for a missing one', function () {
      const { mmio } = setup();
      mmio.write(MMIO_REG.QUEUE_SEL, 1);
      const q1 = mmio.read(MMIO_REG.QUEUE_NUM_MAX);
      mmio.write(MMIO_REG.QUEUE_SEL, 2);
      expect([q1, mmio.read(MMIO_REG.QUEUE_NUM_MAX)]).to.deep.equal([64, 0]);
    });

    it('ConfigGeneration mirrors the device and config space reads with 1, 2, 4 and 8 byte widths', function () {
      const { mmio } = setup();
      expect(mmio.read(MMIO_REG.CONFIG_GENERATION)).to.equal(7);
      const b1 = Buffer.alloc(1);
      const b2 = Buffer.alloc(2);
      const b4 = Buffer.alloc(4);
      const b8 = Buffer.alloc(8);
      mmio.readBytes(0x100 + 3, b1);
      mmio.readBytes(0x100 + 2, b2);
      mmio.readBytes(0x100 + 4, b4);
      mmio.readBytes(0x100 + 8, b8);
      expect([b1[0], b2.readUInt16LE(), b4.readUInt32LE(), b8.readBigUInt64LE()]).to.deep.equal([3, 0x0302, 0x07060504, 0x0f0e0d0c0b0a0908n]);
    });

    it('forwards config space writes to the device with their offset inside config space', function () {
      const { mmio, dev } = setup();
      mmio.writeBytes(0x120, Buffer.from([1]));
      expect(dev.configWrites).to.deep.equal([{ offset: 0x20, data: [1] }]);
    });
  });

  describe('device status state machine', function () {
    it('ACKNOWLEDGE, DRIVER, features, FEATURES_OK: the device gets the 64-bit feature set and FEATURES_OK stays set', function () {
      const { mmio, dev } = setup();
      negotiate(mmio, VERSION_1 | (1n << 9n));
      expect(dev.driverFeatures).to.equal(VERSION_1 | (1n << 9n));
      expect(mmio.read(MMIO_REG.STATUS)).to.equal(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
    });

    it('FEATURES_OK stays clear when the driver accepts a feature the device did not offer', function () {
      const { mmio, dev } = setup();
      negotiate(mmio, VERSION_1 | (1n << 12n));
      expect(mmio.read(MMIO_REG.STATUS)).to.equal(S.ACKNOWLEDGE | S.DRIVER);
      expect(dev.driverFeatures).to.equal(0n);
    });

    it('FEATURES_OK stays clear without VIRTIO_F_VERSION_1 (virtio-mmio v2 is modern only)', function () {
      const { mmio } = setup();
      negotiate(mmio, 1n << 9n);
      expect(mmio.read(MMIO_REG.STATUS) & S.FEATURES_OK).to.equal(0);
    });

    it('ignores DRIVER before ACKNOWLEDGE, FEATURES_OK before DRIVER and DRIVER_OK before FEATURES_OK', function () {
      const { mmio } = setup();
      mmio.write(MMIO_REG.STATUS, S.DRIVER);
      const a = mmio.read(MMIO_REG.STATUS);
      mmio.write(MMIO_REG.STATUS, S.ACKNOWLEDGE);
      mmio.write(MMIO_REG.STATUS, S.ACKNOWLEDGE | S.FEATURES_OK);
      const b = mmio.read(MMIO_REG.STATUS);
      mmio.write(MMIO_REG.STATUS, S.ACKNOWLEDGE | S.DRIVER);
      mmio.write(MMIO_REG.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK);
      expect([a, b, mmio.read(MMIO_REG.STATUS)]).to.deep.equal([0, S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.DRIVER]);
      expect(mmio.ignoredAccesses).to.equal(3);
    });

    it('ignores a write that clears status bits without a reset', function () {
      const { mmio } = setup();
      negotiate(mmio, VERSION_1);
      mmio.write(MMIO_REG.STATUS, S.ACKNOWLEDGE);
      expect(mmio.read(MMIO_REG.STATUS)).to.equal(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
    });

    it('ignores DriverFeatures writes after FEATURES_OK', function () {
      const { mmio, dev } = setup();
      negotiate(mmio, VERSION_1);
      mmio.write(MMIO_REG.DRIVER_FEATURES_SEL, 0);
      mmio.write(MMIO_REG.DRIVER_FEATURES, 1 << 9);
      mmio.write(MMIO_REG.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK);
      expect(dev.driverFeatures).to.equal(VERSION_1);
    });

    it('writing 0 resets: device reset, features, queues and interrupt status cleared, Status reads 0 once settled', async function () {
      const { mmio, dev } = setup();
      negotiate(mmio, VERSION_1);
      setQueue(mmio, 0, 16, 0x1000, 0x2000, 0x3000);
      mmio.write(MMIO_REG.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK);
      dev.started[0]?.q.signalUsed();
      mmio.write(MMIO_REG.STATUS, 0);
      expect(mmio.read(MMIO_REG.STATUS)).to.not.equal(0); // reset still in progress
      await mmio.settled();
      mmio.write(MMIO_REG.QUEUE_SEL, 0);
      expect([mmio.read(MMIO_REG.STATUS), mmio.read(MMIO_REG.QUEUE_READY), mmio.read(MMIO_REG.INTERRUPT_STATUS), dev.resets]).to.deep.equal([0, 0, 0, 1]);
    });
  });

  describe('queues', function () {
    it('QueueReady=1 starts the device queue with the size and 64-bit ring addresses written', function () {
      const { mmio, dev } = setup();
      negotiate(mmio, VERSION_1);
      setQueue(mmio, 1, 32, 0x1000, 0x1200, 0x2000);
      const s = dev.started[0];
      expect([s?.index, s?.q.size, s?.q.descTable, s?.q.availRing, s?.q.usedRing]).to.deep.equal([1, 32, 0x1000, 0x1200, 0x2000]);
      expect(mmio.read(MMIO_REG.QUEUE_READY)).to.equal(1);
    });

    it('ignores QueueReady=1 before FEATURES_OK (the queue stays not ready)', function () {
      const { mmio, dev } = setup();
      mmio.write(MMIO_REG.STATUS, S.ACKNOWLEDGE);
      mmio.write(MMIO_REG.STATUS, S.ACKNOWLEDGE | S.DRIVER);
      mmio.write(MMIO_REG.QUEUE_SEL, 0);
      mmio.write(MMIO_REG.QUEUE_READY, 1);
      expect([dev.started.length, mmio.read(MMIO_REG.QUEUE_READY)]).to.deep.equal([0, 0]);
    });

    it('rings outside guest RAM: queue not ready, DEVICE_NEEDS_RESET and a config-change interrupt bit', function () {
      const { mmio } = setup();
      negotiate(mmio, VERSION_1);
      setQueue(mmio, 0, 16, 0x7_0000_0000, 0x2000, 0x3000);
      expect(mmio.read(MMIO_REG.QUEUE_READY)).to.equal(0);
      expect(mmio.read(MMIO_REG.STATUS) & S.DEVICE_NEEDS_RESET).to.equal(S.DEVICE_NEEDS_RESET);
      expect(mmio.read(MMIO_REG.INTERRUPT_STATUS) & MMIO_INT.CONFIG).to.equal(MMIO_INT.CONFIG);
    });

    it('a queue size that is not a power of two (or above QueueNumMax) means DEVICE_NEEDS_RESET', function () {
      const { mmio, dev } = setup();
      negotiate(mmio, VERSION_1);
      setQueue(mmio, 0, 24, 0x1000, 0x2000, 0x3000);
      expect([dev.started.length, mmio.read(MMIO_REG.STATUS) & S.DEVICE_NEEDS_RESET]).to.deep.equal([0, S.DEVICE_NEEDS_RESET]);
    });

    it('queue registers are frozen while the queue is ready', async function () {
      const { mmio, dev } = setup();
      negotiate(mmio, VERSION_1);
      setQueue(mmio, 0, 16, 0x1000, 0x2000, 0x3000);
      mmio.write(MMIO_REG.QUEUE_NUM, 8);
      mmio.write(MMIO_REG.QUEUE_READY, 0);
      mmio.write(MMIO_REG.QUEUE_READY, 1);
      await mmio.settled();
      expect(dev.started.map((s) => s.q.size)).to.deep.equal([16, 16]);
      expect(dev.stopped).to.deep.equal([0]);
    });

    it('a kick before DRIVER_OK is held and delivered at DRIVER_OK; a kick for a queue that is not ready is ignored', function () {
      const { mmio, dev } = setup();
      negotiate(mmio, VERSION_1);
      setQueue(mmio, 0, 16, 0x1000, 0x2000, 0x3000);
      mmio.write(MMIO_REG.QUEUE_NOTIFY, 0);
      mmio.write(MMIO_REG.QUEUE_NOTIFY, 1);
      expect(dev.notified).to.deep.equal([]);
      mmio.write(MMIO_REG.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK);
      mmio.write(MMIO_REG.QUEUE_NOTIFY, 0);
      expect(dev.notified).to.deep.equal([0, 0]);
    });
  });

  describe('interrupts', function () {
    it('a used-buffer notification sets InterruptStatus bit 0 and raises the interrupt; InterruptACK clears it', function () {
      const { mmio, dev, irqs } = setup();
      negotiate(mmio, VERSION_1);
      setQueue(mmio, 0, 16, 0x1000, 0x2000, 0x3000);
      dev.started[0]?.q.signalUsed();
      const before = mmio.read(MMIO_REG.INTERRUPT_STATUS);
      mmio.write(MMIO_REG.INTERRUPT_ACK, MMIO_INT.VRING);
      expect([before, mmio.read(MMIO_REG.INTERRUPT_STATUS), irqs.n]).to.deep.equal([MMIO_INT.VRING, 0, 1]);
    });

    it('a device configuration change sets InterruptStatus bit 1', function () {
      const { mmio, dev, irqs } = setup();
      dev.fireConfigChange();
      expect([mmio.read(MMIO_REG.INTERRUPT_STATUS), irqs.n]).to.deep.equal([MMIO_INT.CONFIG, 1]);
    });
  });

  describe('bad accesses', function () {
    it('unknown offsets and write-only registers read 0; writes to read-only registers are ignored', function () {
      const { mmio } = setup();
      mmio.write(MMIO_REG.MAGIC_VALUE, 0);
      mmio.write(0x0f0, 1);
      expect([mmio.read(0x018), mmio.read(MMIO_REG.QUEUE_DESC_LOW), mmio.read(MMIO_REG.MAGIC_VALUE)]).to.deep.equal([0, 0, MMIO_MAGIC]);
      expect(mmio.ignoredAccesses).to.equal(4);
    });

    it('control registers accessed with a 1, 2 or 8 byte width or misaligned: reads give 0, writes change nothing', function () {
      const { mmio } = setup();
      const b2 = Buffer.alloc(2, 0xff);
      mmio.readBytes(MMIO_REG.MAGIC_VALUE, b2);
      mmio.writeBytes(MMIO_REG.STATUS, Buffer.from([S.ACKNOWLEDGE]));
      mmio.writeBytes(MMIO_REG.STATUS + 1, Buffer.from([1, 0, 0, 0]));
      mmio.writeBytes(MMIO_REG.STATUS, Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]));
      expect([b2.readUInt16LE(), mmio.read(MMIO_REG.STATUS)]).to.deep.equal([0, 0]);
    });

    it('a device that throws while serving the guest (config read, kick) gives DEVICE_NEEDS_RESET, not a VMM crash', function () {
      const { mmio, dev } = setup();
      negotiate(mmio, VERSION_1);
      setQueue(mmio, 0, 16, 0x1000, 0x2000, 0x3000);
      mmio.write(MMIO_REG.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK);
      dev.readConfig = (): void => {
        throw new RangeError('bug in the device');
      };
      dev.queueNotify = (): void => {
        throw new TypeError('another bug');
      };
      const b = Buffer.alloc(4, 0xff);
      expect(() => mmio.readBytes(0x100, b)).to.not.throw();
      expect(() => mmio.write(MMIO_REG.QUEUE_NOTIFY, 0)).to.not.throw();
      expect(mmio.read(MMIO_REG.STATUS) & S.DEVICE_NEEDS_RESET).to.equal(S.DEVICE_NEEDS_RESET);
      expect(b.readUInt32LE()).to.equal(0);
    });

    it('survives any sequence of guest register accesses without throwing, keeping Status consistent', function () {
      const offsets = [...Object.values(MMIO_REG), 0x018, 0x0f8, 0x104, 0x1fc, 0x1ff];
      const access = fc.record({
        offset: fc.oneof(fc.constantFrom(...offsets), fc.integer({ min: 0, max: 0x1ff })),
        width: fc.constantFrom(1, 2, 4, 8),
        write: fc.boolean(),
        value: fc.oneof(fc.constantFrom(0, 1, 2, 3, 7, 11, 15, 16, 0x80, 0xffffffff), fc.nat({ max: 0xffffffff })),
      });
      fc.assert(
        fc.property(fc.array(access, { maxLength: 60 }), (seq) => {
          const { mmio } = setup();
          for (const a of seq) {
            const b = Buffer.alloc(a.width);
            if (a.write) {
              b.writeUIntLE(a.value % 2 ** (8 * Math.min(a.width, 4)), 0, Math.min(a.width, 4));
              mmio.writeBytes(a.offset, b);
            } else {
              mmio.readBytes(a.offset, b);
            }
            const st = mmio.status;
            if ((st & S.DRIVER_OK) !== 0 && (st & S.FEATURES_OK) === 0) return false;
            if ((st & S.FEATURES_OK) !== 0 && (st & S.DRIVER) === 0) return false;
          }
          return true;
        }),
        { numRuns: 300 },
      );
    });
  });

  describe('with the real virtio-blk device and the simulated driver', function () {
    async function blkSetup(readonly = false): Promise<{ mmio: VirtioMmioTransport; drv: MockBlkDriver; q: MockVirtqueue; dev: VirtioBlkDevice; irqs: { n: number } }> {
      const disk = createMemoryDisk({ size: 64 * 512, readonly });
      const memory = new GuestMemory([{ guestAddr: 0x10000, buffer: Buffer.alloc(1 << 18) }]);
      const dev = new VirtioBlkDevice(disk, { queueSize: 16 });
      const drv = new MockBlkDriver(dev, memory, { queueSize: 16 });
      const q = drv.queues[0] as MockVirtqueue;
      const irqs = { n: 0 };
      const mmio = new VirtioMmioTransport({
        device: dev,
        memory,
        raiseInterrupt: () => {
          irqs.n++;
          q.queueStart().signalUsed();
        },
      });
      mmio.write(MMIO_REG.STATUS, 0);
      await mmio.settled();
      negotiate(mmio, VERSION_1 | (1n << 9n) | (readonly ? 1n << 5n : 0n));
      setQueue(mmio, 0, 16, q.descTable, q.availRing, q.usedRing);
      mmio.write(MMIO_REG.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK);
      return { mmio, drv, q, dev, irqs };
    }

    it('a write then a read through QueueNotify round-trips the data and raises used-buffer interrupts', async function () {
      const { mmio, drv, irqs } = await blkSetup();
      const data = Buffer.alloc(1024, 0x5a);
      const w = drv.submit(0, { type: VIRTIO_BLK_T.OUT, sector: 3, data });
      mmio.write(MMIO_REG.QUEUE_NOTIFY, 0);
      const [wc] = await drv.complete([w]);
      const r = drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: 3, readLen: 1024 });
      mmio.write(MMIO_REG.QUEUE_NOTIFY, 0);
      const [rc] = await drv.complete([r]);
      expect([wc?.status, rc?.status]).to.deep.equal([VIRTIO_BLK_S.OK, VIRTIO_BLK_S.OK]);
      expect(rc?.data.equals(data)).to.equal(true);
      expect(irqs.n).to.be.greaterThanOrEqual(2);
      expect(mmio.read(MMIO_REG.INTERRUPT_STATUS) & MMIO_INT.VRING).to.equal(MMIO_INT.VRING);
    });

    it('QueueReady 0 then 1 before the stop has drained reads back 1 and restarts the queue after the drain, without NEEDS_RESET', async function () {
      const { mmio, drv } = await blkSetup();
      mmio.write(MMIO_REG.QUEUE_SEL, 0);
      mmio.write(MMIO_REG.QUEUE_READY, 0);
      mmio.write(MMIO_REG.QUEUE_READY, 1);
      expect(mmio.read(MMIO_REG.QUEUE_READY)).to.equal(1);
      await mmio.settled();
      expect(mmio.read(MMIO_REG.STATUS) & S.DEVICE_NEEDS_RESET).to.equal(0);
      const r = drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: 0, readLen: 512 });
      mmio.write(MMIO_REG.QUEUE_NOTIFY, 0);
      const [rc] = await drv.complete([r]);
      expect(rc?.status).to.equal(VIRTIO_BLK_S.OK);
    });

    it('a read past the end of the disk completes with IOERR', async function () {
      const { mmio, drv } = await blkSetup();
      const r = drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: 64, readLen: 512 });
      mmio.write(MMIO_REG.QUEUE_NOTIFY, 0);
      const [rc] = await drv.complete([r]);
      expect(rc?.status).to.equal(VIRTIO_BLK_S.IOERR);
    });

    it('a read-only disk offers RO and a write completes with IOERR', async function () {
      const { mmio, drv } = await blkSetup(true);
      mmio.write(MMIO_REG.DEVICE_FEATURES_SEL, 0);
      expect(mmio.read(MMIO_REG.DEVICE_FEATURES) & (1 << 5)).to.equal(1 << 5);
      const w = drv.submit(0, { type: VIRTIO_BLK_T.OUT, sector: 0, data: Buffer.alloc(512, 1) });
      mmio.write(MMIO_REG.QUEUE_NOTIFY, 0);
      const [wc] = await drv.complete([w]);
      expect(wc?.status).to.equal(VIRTIO_BLK_S.IOERR);
    });

    it('rings placed outside guest RAM put the real device in DEVICE_NEEDS_RESET; a reset recovers it', async function () {
      const disk = createMemoryDisk({ size: 64 * 512 });
      const memory = new GuestMemory([{ guestAddr: 0x10000, buffer: Buffer.alloc(1 << 16) }]);
      const dev = new VirtioBlkDevice(disk, { queueSize: 16 });
      const mmio = new VirtioMmioTransport({ device: dev, memory, raiseInterrupt: () => undefined });
      negotiate(mmio, VERSION_1);
      setQueue(mmio, 0, 16, 0x100000, 0x100100, 0x101000);
      const broken = mmio.read(MMIO_REG.STATUS);
      mmio.write(MMIO_REG.STATUS, 0);
      await mmio.settled();
      expect([broken & S.DEVICE_NEEDS_RESET, mmio.read(MMIO_REG.QUEUE_READY), mmio.read(MMIO_REG.STATUS)]).to.deep.equal([S.DEVICE_NEEDS_RESET, 0, 0]);
    });
  });
});
