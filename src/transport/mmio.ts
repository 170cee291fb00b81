import { VirtioError, hex } from '../errors';
import { addressFromHalves } from '../memory/guest-memory';
import type { GuestMemory } from '../memory/guest-memory';
import { VIRTIO_F, VIRTIO_STATUS, type VirtioDevice } from '../virtio/device';

/**
 * The virtio-mmio transport, version 2 (virtio spec 4.2.2): the register window a guest driver
 * uses to discover, configure and notify one `VirtioDevice`.
 *
 * The model is synchronous: `read`/`write` answer at once (a KVM MMIO exit is answered before the
 * vCPU resumes). Register writes that start asynchronous device work (reset, stopping a queue) are
 * tracked; `settled()` resolves when all of it is done, and a VMM awaits it before resuming the
 * vCPU, so the guest never observes a half-finished reset.
 *
 * Guest mistakes never throw out of `read`/`write`:
 * - unknown offsets, reads of write-only registers, wrong widths or misaligned accesses to the
 *   control registers: reads return 0, writes are ignored (counted in `ignoredAccesses`);
 * - a status write that clears bits (other than a write of 0 = reset) or skips a step
 *   (DRIVER before ACKNOWLEDGE, FEATURES_OK before DRIVER, DRIVER_OK before FEATURES_OK): ignored;
 * - FEATURES_OK with features the device did not offer, or without VERSION_1: FEATURES_OK stays
 *   clear (the driver sees it when it reads Status back, spec 3.1.1);
 * - feature writes after FEATURES_OK, queue registers before FEATURES_OK or while the queue is
 *   ready: ignored;
 * - QueueReady=1 with a bad size or rings outside guest RAM: the queue stays not ready and the
 *   device enters DEVICE_NEEDS_RESET with a configuration-change interrupt (spec 2.1.2).
 */

/** Register offsets (virtio spec 4.2.2). */
export const MMIO_REG = {
  MAGIC_VALUE: 0x000,
  VERSION: 0x004,
  DEVICE_ID: 0x008,
  VENDOR_ID: 0x00c,
  DEVICE_FEATURES: 0x010,
  DEVICE_FEATURES_SEL: 0x014,
  DRIVER_FEATURES: 0x020,
  DRIVER_FEATURES_SEL: 0x024,
  QUEUE_SEL: 0x030,
  QUEUE_NUM_MAX: 0x034,
  QUEUE_NUM: 0x038,
  QUEUE_READY: 0x044,
  QUEUE_NOTIFY: 0x050,
  INTERRUPT_STATUS: 0x060,
  INTERRUPT_ACK: 0x064,
  STATUS: 0x070,
  QUEUE_DESC_LOW: 0x080,
  QUEUE_DESC_HIGH: 0x084,
  QUEUE_DRIVER_LOW: 0x090,
  QUEUE_DRIVER_HIGH: 0x094,
  QUEUE_DEVICE_LOW: 0x0a0,
  QUEUE_DEVICE_HIGH: 0x0a4,
  SHM_SEL: 0x0ac,
  SHM_LEN_LOW: 0x0b0,
  SHM_LEN_HIGH: 0x0b4,
  SHM_BASE_LOW: 0x0b8,
  SHM_BASE_HIGH: 0x0bc,
  QUEUE_RESET: 0x0c0,
  CONFIG_GENERATION: 0x0fc,
  CONFIG: 0x100,
} as const;

/** "virt" little-endian. */
export const MMIO_MAGIC = 0x74726976;
export const MMIO_VERSION = 2;
/** Our vendor id: "vblk" as a little-endian u32. */
export const MMIO_VENDOR_ID = 0x6b6c6276;
/** Size of the register window a VMM maps for one device (config space included). */
export const MMIO_WINDOW_SIZE = 0x200;

/** InterruptStatus bits. */
export const MMIO_INT = { VRING: 1, CONFIG: 2 } as const;

interface QueueRegs {
  size: number;
  ready: boolean;
  descLo: number;
  descHi: number;
  driverLo: number;
  driverHi: number;
  deviceLo: number;
  deviceHi: number;
  /** Set while the device drains the queue after QueueReady=0; a new start waits for it. */
  stopping: Promise<void> | undefined;
}

function freshQueue(size: number): QueueRegs {
  return { size, ready: false, descLo: 0, descHi: 0, driverLo: 0, driverHi: 0, deviceLo: 0, deviceHi: 0, stopping: undefined };
}

export interface MmioTransportOptions {
  readonly device: VirtioDevice;
  readonly memory: GuestMemory;
  /**
   * Raises the device's interrupt (an irqfd write in the KVM harness). Called after the bit is
   * set in InterruptStatus; edge semantics: one call per event.
   */
  readonly raiseInterrupt: () => void;
  /** Called with a one-line description of each ignored guest mistake (default: nothing). */
  readonly onGuestError?: (message: string) => void;
}

/**
 * @example
 *   const mmio = new VirtioMmioTransport({ device, memory, raiseInterrupt: () => signalEventFd(irqfd) });
 *   // on a KVM MMIO exit inside the window:
 *   if (exit.isWrite) mmio.writeBytes(off, exit.data); else mmio.readBytes(off, exit.data);
 *   await mmio.settled();
 */
export class VirtioMmioTransport {
  readonly device: VirtioDevice;
  readonly memory: GuestMemory;
  readonly #raise: () => void;
  readonly #onGuestError: (message: string) => void;
  #status = 0;
  #deviceFeaturesSel = 0;
  #driverFeaturesSel = 0;
  #driverFeatures = [0, 0];
  #queueSel = 0;
  #queues: QueueRegs[];
  #interruptStatus = 0;
  #shmSel = 0;
  /** Set when the transport itself decided the device needs a reset (bad queue setup). */
  #needsReset = false;
  /** Kicks that arrived before DRIVER_OK, replayed when it is set. */
  #pendingKicks = new Set<number>();
  #pending: Promise<void>[] = [];
  #resetting = false;
  #statusBeforeReset = 0;
  /** Guest accesses ignored as invalid (for tests and diagnostics). */
  ignoredAccesses = 0;
  /** Interrupts raised. */
  interruptsRaised = 0;

  constructor(opts: MmioTransportOptions) {
    this.device = opts.device;
    this.memory = opts.memory;
    this.#raise = opts.raiseInterrupt;
    this.#onGuestError = opts.onGuestError ?? ((): void => undefined);
    this.#queues = this.#freshQueues();
    this.device.onConfigChange(() => this.#interrupt(MMIO_INT.CONFIG));
  }

  #freshQueues(): QueueRegs[] {
    return Array.from({ length: this.device.numQueues }, () => freshQueue(this.device.maxQueueSize));
  }

  /** Current Status register value as the driver reads it (DEVICE_NEEDS_RESET included). */
  get status(): number {
    // While a reset is in progress the old value stays visible: a driver polls until it reads 0.
    if (this.#resetting) return this.#statusBeforeReset;
    return this.#status | (this.#needsReset || this.device.needsReset ? VIRTIO_STATUS.DEVICE_NEEDS_RESET : 0);
  }

  get interruptStatus(): number {
    return this.#interruptStatus;
  }

  /** True when queue `i` is ready (QueueReady reads 1). */
  queueReady(i: number): boolean {
    return this.#queues[i]?.ready ?? false;
  }

  /** Resolves when device work started by register writes (reset, queue stop) has finished. */
  async settled(): Promise<void> {
    while (this.#pending.length > 0) {
      const p = this.#pending.splice(0);
      await Promise.all(p);
    }
  }

  #track(p: Promise<void>): void {
    this.#pending.push(p);
  }

  #ignore(what: string): void {
    this.ignoredAccesses++;
    this.#onGuestError(what);
  }

  #interrupt(bit: number): void {
    this.#interruptStatus |= bit;
    this.interruptsRaised++;
    this.#raise();
  }

  /**
   * Handles a guest read of `out.length` bytes at `offset` in the window, filling `out`
   * (little-endian). Control registers need 4-byte aligned accesses; config space any 1/2/4/8.
   */
  readBytes(offset: number, out: Buffer): void {
    out.fill(0);
    if (offset >= MMIO_REG.CONFIG) {
      if (!this.#configAccessOk(offset, out.length, 'read')) return;
      this.#guard('read config space', () => this.device.readConfig(offset - MMIO_REG.CONFIG, out));
      return;
    }
    if (out.length !== 4 || offset % 4 !== 0) {
      this.#ignore(`Cannot read virtio-mmio register ${hex(offset)}: ${out.length}-byte access (registers are 32-bit)`);
      return;
    }
    out.writeUInt32LE(this.read(offset) >>> 0);
  }

  /** Handles a guest write of `data` at `offset` (see readBytes for widths). */
  writeBytes(offset: number, data: Buffer): void {
    if (offset >= MMIO_REG.CONFIG) {
      if (!this.#configAccessOk(offset, data.length, 'write')) return;
      if (this.#resetting) return this.#ignore(`Cannot write config at ${hex(offset)}: device reset in progress`);
      this.#guard('write config space', () => this.device.writeConfig(offset - MMIO_REG.CONFIG, data));
      return;
    }
    if (data.length !== 4 || offset % 4 !== 0) {
      this.#ignore(`Cannot write virtio-mmio register ${hex(offset)}: ${data.length}-byte access (registers are 32-bit)`);
      return;
    }
    this.write(offset, data.readUInt32LE());
  }

  #configAccessOk(offset: number, len: number, what: string): boolean {
    if (![1, 2, 4, 8].includes(len) || offset % len !== 0 || offset + len > MMIO_WINDOW_SIZE) {
      this.#ignore(`Cannot ${what} config space at ${hex(offset)}: ${len}-byte access is not an aligned 1/2/4/8-byte access inside the window`);
      return false;
    }
    return true;
  }

  /** A 32-bit read of control register `offset` (< 0x100). Unknown and write-only registers read 0. */
  read(offset: number): number {
    const q = this.#queues[this.#queueSel];
    switch (offset) {
      case MMIO_REG.MAGIC_VALUE:
        return MMIO_MAGIC;
      case MMIO_REG.VERSION:
        return MMIO_VERSION;
      case MMIO_REG.DEVICE_ID:
        return this.device.deviceType;
      case MMIO_REG.VENDOR_ID:
        return MMIO_VENDOR_ID;
      case MMIO_REG.DEVICE_FEATURES:
        return this.#deviceFeaturesSel > 1 ? 0 : Number((this.device.deviceFeatures >> BigInt(32 * this.#deviceFeaturesSel)) & 0xffffffffn);
      case MMIO_REG.QUEUE_NUM_MAX:
        return q === undefined ? 0 : this.device.maxQueueSize;
      case MMIO_REG.QUEUE_READY:
        return q?.ready === true ? 1 : 0;
      case MMIO_REG.INTERRUPT_STATUS:
        return this.#interruptStatus;
      case MMIO_REG.STATUS:
        return this.status;
      case MMIO_REG.SHM_LEN_LOW:
      case MMIO_REG.SHM_LEN_HIGH:
      case MMIO_REG.SHM_BASE_LOW:
      case MMIO_REG.SHM_BASE_HIGH:
        return 0xffffffff; // no shared memory regions: length and base read as -1 (spec 4.2.2)
      case MMIO_REG.QUEUE_RESET:
        return 0;
      case MMIO_REG.CONFIG_GENERATION:
        return this.device.configGeneration >>> 0;
      default:
        this.#ignore(`Cannot read virtio-mmio register ${hex(offset)}: not a readable register`);
        return 0;
    }
  }

  /** A 32-bit write of `value` to control register `offset` (< 0x100). */
  write(offset: number, value: number): void {
    value >>>= 0;
    if (this.#resetting && offset !== MMIO_REG.STATUS) {
      this.#ignore(`Cannot write virtio-mmio register ${hex(offset)}: device reset in progress`);
      return;
    }
    switch (offset) {
      case MMIO_REG.DEVICE_FEATURES_SEL:
        this.#deviceFeaturesSel = value;
        return;
      case MMIO_REG.DRIVER_FEATURES_SEL:
        this.#driverFeaturesSel = value;
        return;
      case MMIO_REG.DRIVER_FEATURES:
        return this.#writeDriverFeatures(value);
      case MMIO_REG.QUEUE_SEL:
        this.#queueSel = value;
        return;
      case MMIO_REG.QUEUE_NUM:
      case MMIO_REG.QUEUE_DESC_LOW:
      case MMIO_REG.QUEUE_DESC_HIGH:
      case MMIO_REG.QUEUE_DRIVER_LOW:
      case MMIO_REG.QUEUE_DRIVER_HIGH:
      case MMIO_REG.QUEUE_DEVICE_LOW:
      case MMIO_REG.QUEUE_DEVICE_HIGH:
        return this.#writeQueueReg(offset, value);
      case MMIO_REG.QUEUE_READY:
        return this.#writeQueueReady(value);
      case MMIO_REG.QUEUE_NOTIFY:
        this.notify(value & 0xffff);
        return;
      case MMIO_REG.INTERRUPT_ACK:
        this.#interruptStatus &= ~value;
        return;
      case MMIO_REG.STATUS:
        return this.#writeStatus(value);
      case MMIO_REG.SHM_SEL:
        this.#shmSel = value;
        return;
      case MMIO_REG.QUEUE_RESET:
        return this.#ignore('Cannot reset a single queue: VIRTIO_F_RING_RESET is not offered');
      default:
        this.#ignore(`Cannot write virtio-mmio register ${hex(offset)}: not a writable register`);
    }
  }

  /**
   * A queue notification (QueueNotify written, through an MMIO exit or an ioeventfd).
   * Forwarded to the device only for a ready queue after DRIVER_OK; an early kick is remembered
   * and replayed when DRIVER_OK is set (the device consumes nothing before DRIVER_OK).
   */
  notify(index: number): void {
    const q = this.#queues[index];
    if (q === undefined) return this.#ignore(`Cannot notify queue ${index}: the device has ${this.#queues.length} queue(s)`);
    if (!q.ready) return this.#ignore(`Cannot notify queue ${index}: it is not ready`);
    if ((this.#status & VIRTIO_STATUS.DRIVER_OK) === 0 || this.#resetting) {
      this.#pendingKicks.add(index);
      return;
    }
    this.#guard(`notify queue ${index}`, () => this.device.queueNotify(index));
  }

  #writeDriverFeatures(value: number): void {
    const st = this.#status;
    if ((st & VIRTIO_STATUS.DRIVER) === 0 || (st & VIRTIO_STATUS.FEATURES_OK) !== 0) {
      return this.#ignore(`Cannot write DriverFeatures in status ${hex(st)}: only between DRIVER and FEATURES_OK`);
    }
    if (this.#driverFeaturesSel > 1) {
      if (value !== 0) this.#ignore(`Cannot accept feature word ${this.#driverFeaturesSel}: the device offers none there`);
      return;
    }
    this.#driverFeatures[this.#driverFeaturesSel] = value;
  }

  #writeQueueReg(offset: number, value: number): void {
    const q = this.#queues[this.#queueSel];
    if (q === undefined) return this.#ignore(`Cannot configure queue ${this.#queueSel}: the device has ${this.#queues.length} queue(s)`);
    if ((this.#status & VIRTIO_STATUS.FEATURES_OK) === 0) return this.#ignore(`Cannot configure queue ${this.#queueSel} before FEATURES_OK`);
    if (q.ready) return this.#ignore(`Cannot configure queue ${this.#queueSel} register ${hex(offset)}: the queue is ready`);
    switch (offset) {
      case MMIO_REG.QUEUE_NUM:
        q.size = value;
        return;
      case MMIO_REG.QUEUE_DESC_LOW:
        q.descLo = value;
        return;
      case MMIO_REG.QUEUE_DESC_HIGH:
        q.descHi = value;
        return;
      case MMIO_REG.QUEUE_DRIVER_LOW:
        q.driverLo = value;
        return;
      case MMIO_REG.QUEUE_DRIVER_HIGH:
        q.driverHi = value;
        return;
      case MMIO_REG.QUEUE_DEVICE_LOW:
        q.deviceLo = value;
        return;
      case MMIO_REG.QUEUE_DEVICE_HIGH:
        q.deviceHi = value;
        return;
    }
  }

  #writeQueueReady(value: number): void {
    const index = this.#queueSel;
    const q = this.#queues[index];
    if (q === undefined) return this.#ignore(`Cannot enable queue ${index}: the device has ${this.#queues.length} queue(s)`);
    if (value === 0) {
      if (!q.ready) return;
      q.ready = false;
      this.#pendingKicks.delete(index);
      const stopping = this.device.stopQueue(index).then(
        () => undefined,
        (e: unknown) => this.#fail(`Cannot stop queue ${index}: ${e instanceof Error ? e.message : String(e)}`),
      );
      q.stopping = stopping;
      this.#track(
        stopping.then(() => {
          if (q.stopping === stopping) q.stopping = undefined;
        }),
      );
      return;
    }
    if (value !== 1) return this.#ignore(`Cannot write QueueReady ${value}: only 0 and 1 are valid`);
    if (q.ready) return;
    if ((this.#status & VIRTIO_STATUS.FEATURES_OK) === 0) return this.#ignore(`Cannot enable queue ${index} before FEATURES_OK`);
    if ((this.#status & VIRTIO_STATUS.FAILED) !== 0) return this.#ignore(`Cannot enable queue ${index}: the driver set FAILED`);
    const stopping = q.stopping;
    if (stopping !== undefined) {
      // QueueReady=1 while the previous stop still drains: the register reads back the value
      // written (spec 4.2.2), and the device starts the queue as soon as the drain completes.
      q.ready = true;
      this.#track(
        stopping.then(() => {
          if (q.ready && q.stopping === undefined) this.#startQueue(index, q);
        }),
      );
      return;
    }
    this.#startQueue(index, q);
  }

  #startQueue(index: number, q: QueueRegs): void {
    const desc = addressFromHalves(q.descLo, q.descHi);
    const avail = addressFromHalves(q.driverLo, q.driverHi);
    const used = addressFromHalves(q.deviceLo, q.deviceHi);
    try {
      if (q.size === 0 || q.size > this.device.maxQueueSize || (q.size & (q.size - 1)) !== 0) {
        throw new VirtioError('E_VIRTIO_RING', `Cannot start queue ${index}: size ${q.size} is not a power of two in 1..${this.device.maxQueueSize}`);
      }
      if (desc < 0 || avail < 0 || used < 0) {
        throw new VirtioError('E_VIRTIO_RING', `Cannot start queue ${index}: a ring address is above 2^53 (outside guest RAM)`);
      }
      this.device.startQueue(index, {
        memory: this.memory,
        size: q.size,
        descTable: desc,
        availRing: avail,
        usedRing: used,
        signalUsed: () => this.#interrupt(MMIO_INT.VRING),
      });
      q.ready = true;
    } catch (e) {
      q.ready = false;
      // VirtioError E_VIRTIO_RING for a bad geometry; anything else is treated the same way:
      // the guest's input must never crash the VMM.
      this.#fail(e instanceof Error ? e.message : String(e));
    }
  }

  /** Runs a device call made on the guest's behalf; a throw puts the device in NEEDS_RESET. */
  #guard(what: string, fn: () => void): void {
    try {
      fn();
    } catch (e) {
      this.#fail(`Cannot ${what}: ${e instanceof Error ? e.message : String(e)}`);
    }
  }

  /** A guest error that leaves the device unusable until reset: DEVICE_NEEDS_RESET + config irq. */
  #fail(message: string): void {
    this.#onGuestError(message);
    if (this.#needsReset) return;
    this.#needsReset = true;
    if ((this.#status & VIRTIO_STATUS.DRIVER_OK) !== 0) this.#interrupt(MMIO_INT.CONFIG);
    else this.#interruptStatus |= MMIO_INT.CONFIG;
  }

  #writeStatus(value: number): void {
    if (value === 0) return this.#reset();
    if (this.#resetting) return this.#ignore('Cannot write Status: device reset in progress');
    const old = this.#status;
    const v = value & ~VIRTIO_STATUS.DEVICE_NEEDS_RESET & 0xff;
    const S = VIRTIO_STATUS;
    if ((v & old) !== old) {
      return this.#ignore(`Cannot change Status from ${hex(old)} to ${hex(value)}: bits can only be cleared by a reset (write 0)`);
    }
    const added = v & ~old;
    if (added === 0) return;
    const has = (bit: number): boolean => (v & bit) !== 0;
    if (has(S.DRIVER) && !has(S.ACKNOWLEDGE)) return this.#ignore(`Cannot set DRIVER without ACKNOWLEDGE (Status ${hex(value)})`);
    if (has(S.FEATURES_OK) && !has(S.DRIVER)) return this.#ignore(`Cannot set FEATURES_OK without DRIVER (Status ${hex(value)})`);
    if (has(S.DRIVER_OK) && !has(S.FEATURES_OK)) return this.#ignore(`Cannot set DRIVER_OK without FEATURES_OK (Status ${hex(value)})`);
    let next = v;
    if ((added & S.FEATURES_OK) !== 0 && !this.#acceptFeatures()) next &= ~S.FEATURES_OK;
    if ((next & S.DRIVER_OK) !== 0 && (next & S.FEATURES_OK) === 0) next &= ~S.DRIVER_OK;
    this.#status = next;
    if ((added & S.DRIVER_OK) !== 0 && (next & S.DRIVER_OK) !== 0) {
      const kicks = [...this.#pendingKicks];
      this.#pendingKicks.clear();
      for (const i of kicks) if (this.#queues[i]?.ready === true) this.#guard(`notify queue ${i}`, () => this.device.queueNotify(i));
    }
  }

  #acceptFeatures(): boolean {
    const features = BigInt(this.#driverFeatures[0] ?? 0) | (BigInt(this.#driverFeatures[1] ?? 0) << 32n);
    const extra = features & ~this.device.deviceFeatures;
    if (extra !== 0n) {
      this.#ignore(`Cannot accept driver features ${hex(features)}: bits ${hex(extra)} were not offered`);
      return false;
    }
    if ((features & (1n << VIRTIO_F.VERSION_1)) === 0n) {
      this.#ignore(`Cannot accept driver features ${hex(features)}: VIRTIO_F_VERSION_1 is required by virtio-mmio version 2`);
      return false;
    }
    let accepted = false;
    this.#guard('set driver features', () => {
      accepted = this.device.setDriverFeatures(features);
    });
    if (!accepted) {
      this.#ignore(`Cannot accept driver features ${hex(features)}: the device refused them`);
      return false;
    }
    return true;
  }

  /** Status = 0: the device forgets everything (features, queues, interrupts) and resets. */
  #reset(): void {
    if (this.#resetting) return;
    this.#resetting = true;
    this.#statusBeforeReset = this.status || VIRTIO_STATUS.ACKNOWLEDGE;
    this.#status = 0;
    this.#deviceFeaturesSel = 0;
    this.#driverFeaturesSel = 0;
    this.#driverFeatures = [0, 0];
    this.#queueSel = 0;
    this.#queues = this.#freshQueues();
    this.#interruptStatus = 0;
    this.#shmSel = 0;
    this.#pendingKicks.clear();
    this.#track(
      this.device.reset().then(
        () => {
          this.#needsReset = false;
          this.#resetting = false;
        },
        (e: unknown) => {
          this.#resetting = false;
          this.#fail(`Cannot reset the device: ${e instanceof Error ? e.message : String(e)}`);
        },
      ),
    );
  }

  /** The selected shared-memory region (none exist; kept so the register round-trips). */
  get shmSel(): number {
    return this.#shmSel;
  }
}
