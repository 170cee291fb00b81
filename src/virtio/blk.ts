import * as path from 'node:path';
import type { DiskImage } from '../disk/disk-image';
import { VirtioError, isVblkError } from '../errors';
import type { VirtioDevice, QueueStart } from './device';
import { VIRTIO_F } from './device';
import { SplitQueue, MAX_QUEUE_SIZE } from './queue';
import { BlkRequest } from './blk-request';
import { AdaptivePoll } from './adaptive-poll';
import type { PollClock } from './adaptive-poll';
import type { BlkRequestHost } from './blk-request';
import { BLK_CONFIG, VIRTIO_BLK_F, VIRTIO_BLK_ID_BYTES, encodeBlkConfig } from './blk-config';

/** Options of a virtio-blk device. */
export interface VirtioBlkOptions {
  /** Number of request queues (MQ is offered when > 1). Default 1, at most 256. */
  readonly numQueues?: number;
  /** Largest queue size the driver may choose (power of two <= 32768). Default 256. */
  readonly queueSize?: number;
  /** GET_ID string (at most 20 bytes); default: the image file name, truncated to 20 bytes. */
  readonly serial?: string;
  /** Expose the disk read-only (RO feature) even when the image is writable. */
  readonly readonly?: boolean;
  /** Initial write-cache mode: true = writeback (default), false = writethrough. */
  readonly writeback?: boolean;
  /** Largest discard / write-zeroes segment count per request. Default 32. */
  readonly maxDiscardSeg?: number;
  /** Preferred I/O size in bytes for the topology hint (opt_io_size); default: the cluster size if known, else 0. */
  readonly optIoSize?: number;
  /**
   * Longest adaptive poll window in microseconds after a queue goes empty (kicks stay
   * suppressed while it runs; see adaptive-poll.ts). Default 0: off.
   */
  readonly pollMaxUs?: number;
  /** Clock of the poll policy, in nanoseconds; injectable for tests. Default performance.now(). */
  readonly pollClock?: PollClock;
}

/** Per-segment byte limit advertised in size_max. */
const SIZE_MAX = 1 << 20;
/** Largest discard / write-zeroes range per segment, in sectors (2 GiB). */
const MAX_DWZ_SECTORS = 1 << 22;
/**
 * Descriptors one drain may walk before it yields to the event loop. The chain count alone does
 * not bound the work: with a large queue a hostile guest can make every chain as long as the
 * chain cap, which would be size x size descriptor reads in one turn.
 */
const DRAIN_DESCRIPTOR_BUDGET = 65536;

function bit(b: bigint): bigint {
  return 1n << b;
}

/**
 * The virtio-blk device (virtio spec 5.2) over a `DiskImage`, for any transport that speaks the
 * `VirtioDevice` contract (virtio-mmio, vhost-user, the mock driver).
 *
 * Every request popped from a queue is completed exactly once: data requests go to the disk as
 * zero-copy views of guest memory and complete out of order as the disk finishes them; used
 * entries are batched and the driver notified once per batch. Malformed chains get the head back
 * (used length 0) or an IOERR / UNSUPP status; ring corruption stops the queue and raises
 * DEVICE_NEEDS_RESET through the config-change callback.
 *
 * @example
 *   const dev = new VirtioBlkDevice(disk, { numQueues: 2 });
 *   dev.setDriverFeatures(dev.deviceFeatures);
 *   dev.startQueue(0, { memory, size: 256, descTable, availRing, usedRing, signalUsed });
 *   dev.queueNotify(0);
 */
export class VirtioBlkDevice implements VirtioDevice {
  readonly deviceType = 2;
  readonly numQueues: number;
  readonly maxQueueSize: number;
  readonly deviceFeatures: bigint;
  readonly disk: DiskImage;
  readonly readonly: boolean;
  readonly serial: Buffer;
  readonly segMax: number;
  readonly maxDiscardSeg: number;
  /** Longest adaptive poll window per queue, in nanoseconds (0: no polling). */
  readonly pollMaxNs: number;
  readonly pollClock: PollClock | undefined;
  #pollHits = 0;
  #pollMisses = 0;
  readonly #defaultWriteback: number;
  readonly #optIoSize: number;
  #driverFeatures = 0n;
  #writeback: number;
  #configGeneration = 0;
  #capacity: number;
  #needsReset = false;
  #lastError: VirtioError | undefined;
  #config: Buffer = Buffer.alloc(0);
  // Derived from the negotiated features and `writeback`, cached for the per-request path.
  #writethrough = true;
  #discardEnabled = false;
  #writeZeroesEnabled = false;
  readonly #queues: (BlkQueueWorker | undefined)[];
  readonly #configListeners: (() => void)[] = [];

  constructor(disk: DiskImage, opts: VirtioBlkOptions = {}) {
    const numQueues = opts.numQueues ?? 1;
    if (!Number.isInteger(numQueues) || numQueues < 1 || numQueues > 256) throw new RangeError(`Cannot create virtio-blk device: numQueues ${numQueues} is not 1..256`);
    const qs = opts.queueSize ?? 256;
    if (!Number.isInteger(qs) || qs < 2 || qs > MAX_QUEUE_SIZE || (qs & (qs - 1)) !== 0) {
      throw new RangeError(`Cannot create virtio-blk device: queueSize ${qs} is not a power of two in 2..32768`);
    }
    const maxSeg = opts.maxDiscardSeg ?? 32;
    if (!Number.isInteger(maxSeg) || maxSeg < 1 || maxSeg > 4096) throw new RangeError(`Cannot create virtio-blk device: maxDiscardSeg ${maxSeg} is not 1..4096`);
    this.disk = disk;
    this.numQueues = numQueues;
    this.maxQueueSize = qs;
    this.readonly = disk.readonly || opts.readonly === true;
    this.serial = VirtioBlkDevice.#serialBytes(opts.serial ?? path.basename(disk.path));
    this.segMax = Math.max(1, qs - 2);
    this.maxDiscardSeg = maxSeg;
    const pollUs = opts.pollMaxUs ?? 0;
    if (!Number.isFinite(pollUs) || pollUs < 0 || pollUs > 1_000_000) throw new RangeError(`Cannot create virtio-blk device: pollMaxUs ${pollUs} is not 0..1000000`);
    this.pollMaxNs = Math.round(pollUs * 1000);
    this.pollClock = opts.pollClock;
    this.#defaultWriteback = opts.writeback === false ? 0 : 1;
    this.#writeback = this.#defaultWriteback;
    this.#capacity = disk.sectors;
    const cluster = opts.optIoSize ?? (disk.describe().clusterSize ?? 0);
    this.#optIoSize = Math.floor(cluster / 512);
    let f =
      bit(VIRTIO_F.VERSION_1) |
      bit(VIRTIO_F.INDIRECT_DESC) |
      bit(VIRTIO_F.EVENT_IDX) |
      bit(VIRTIO_BLK_F.SEG_MAX) |
      bit(VIRTIO_BLK_F.SIZE_MAX) |
      bit(VIRTIO_BLK_F.BLK_SIZE) |
      bit(VIRTIO_BLK_F.FLUSH) |
      bit(VIRTIO_BLK_F.CONFIG_WCE) |
      bit(VIRTIO_BLK_F.TOPOLOGY) |
      bit(VIRTIO_BLK_F.WRITE_ZEROES);
    if (this.readonly) f |= bit(VIRTIO_BLK_F.RO);
    if (numQueues > 1) f |= bit(VIRTIO_BLK_F.MQ);
    if (disk.canDiscard) f |= bit(VIRTIO_BLK_F.DISCARD);
    this.deviceFeatures = f;
    this.#queues = new Array<BlkQueueWorker | undefined>(numQueues).fill(undefined);
    this.#stateChanged();
  }

  /** Rebuilds the config space and the cached per-request flags after a state change. */
  #stateChanged(): void {
    this.#config = this.#buildConfig();
    this.#writethrough = this.#writeback === 0 || !this.hasFeature(VIRTIO_BLK_F.FLUSH);
    this.#discardEnabled = this.hasFeature(VIRTIO_BLK_F.DISCARD);
    this.#writeZeroesEnabled = this.hasFeature(VIRTIO_BLK_F.WRITE_ZEROES);
  }

  /**
   * The GET_ID answer: spec 5.2.6 calls it an ASCII string, so anything outside printable ASCII
   * (a UTF-8 file name, say, which truncation could also cut mid-character) becomes '_'.
   */
  static #serialBytes(s: string): Buffer {
    const out = Buffer.alloc(VIRTIO_BLK_ID_BYTES);
    out.write(s.slice(0, VIRTIO_BLK_ID_BYTES).replace(/[^\x20-\x7e]/g, '_'), 'latin1');
    return out;
  }

  get driverFeatures(): bigint {
    return this.#driverFeatures;
  }

  get configGeneration(): number {
    return this.#configGeneration;
  }

  get needsReset(): boolean {
    return this.#needsReset;
  }

  /** The ring corruption that set `needsReset`, for logs. */
  get lastError(): VirtioError | undefined {
    return this.#lastError;
  }

  /** Capacity in sectors as exposed in config space. */
  get capacity(): number {
    return this.#capacity;
  }

  /** Current write-cache mode (config `writeback`): 1 writeback, 0 writethrough. */
  get writeback(): number {
    return this.#writeback;
  }

  /** Writes complete only after a flush (writeback = 0, or the driver did not negotiate FLUSH). */
  get writethrough(): boolean {
    return this.#writethrough;
  }

  /** DISCARD was negotiated. */
  get discardEnabled(): boolean {
    return this.#discardEnabled;
  }

  /** WRITE_ZEROES was negotiated. */
  get writeZeroesEnabled(): boolean {
    return this.#writeZeroesEnabled;
  }

  /** True when feature bit `b` was negotiated. */
  hasFeature(b: bigint): boolean {
    return (this.#driverFeatures & bit(b)) !== 0n;
  }

  #buildConfig(): Buffer {
    const maxDwzSectors = Math.min(MAX_DWZ_SECTORS, 0xffffffff);
    return encodeBlkConfig({
      capacity: this.#capacity,
      sizeMax: SIZE_MAX,
      segMax: this.segMax,
      blkSize: 512,
      physicalBlockExp: 0,
      alignmentOffset: 0,
      minIoSize: 1,
      optIoSize: this.#optIoSize,
      writeback: this.#writeback,
      numQueues: this.numQueues,
      maxDiscardSectors: this.disk.canDiscard ? maxDwzSectors : 0,
      maxDiscardSeg: this.disk.canDiscard ? this.maxDiscardSeg : 0,
      discardSectorAlignment: this.disk.canDiscard ? Math.max(1, this.#optIoSize) : 0,
      maxWriteZeroesSectors: maxDwzSectors,
      maxWriteZeroesSeg: this.maxDiscardSeg,
      writeZeroesMayUnmap: this.disk.canWriteZeroes || this.disk.canDiscard ? 1 : 0,
    });
  }

  /**
   * Accepts the driver's features when they are a subset of `deviceFeatures` that includes
   * VERSION_1 (only the modern, little-endian interface is implemented).
   */
  setDriverFeatures(features: bigint): boolean {
    if ((features & ~this.deviceFeatures) !== 0n) return false;
    if ((features & bit(VIRTIO_F.VERSION_1)) === 0n) return false;
    this.#driverFeatures = features;
    // Spec 5.2.5: with CONFIG_WCE but without FLUSH the device starts in writethrough.
    if (this.hasFeature(VIRTIO_BLK_F.CONFIG_WCE) && !this.hasFeature(VIRTIO_BLK_F.FLUSH)) this.#writeback = 0;
    this.#stateChanged();
    return true;
  }

  readConfig(offset: number, out: Uint8Array): void {
    out.fill(0);
    if (!Number.isInteger(offset) || offset < 0 || offset >= this.#config.length) return;
    const n = Math.min(out.length, this.#config.length - offset);
    out.set(this.#config.subarray(offset, offset + n));
  }

  writeConfig(offset: number, data: Uint8Array): void {
    // Only `writeback` is writable, and only once CONFIG_WCE is negotiated.
    if (!this.hasFeature(VIRTIO_BLK_F.CONFIG_WCE)) return;
    const i = BLK_CONFIG.writeback - offset;
    if (!Number.isInteger(offset) || i < 0 || i >= data.length) return;
    this.#writeback = data[i] === 0 ? 0 : 1;
    this.#stateChanged();
  }

  /**
   * Re-reads the disk size (after a resize) and tells the driver through a config change.
   */
  refreshCapacity(): void {
    const c = this.disk.sectors;
    if (c === this.#capacity) return;
    this.#capacity = c;
    this.#stateChanged();
    this.#configGeneration++;
    this.#emitConfigChange();
  }

  startQueue(index: number, q: QueueStart): void {
    this.#checkIndex(index);
    if (this.#queues[index] !== undefined) {
      throw new VirtioError('E_VIRTIO_STATE', `Cannot start virtio-blk queue ${index}: it is already running (stop it first)`);
    }
    const queue = new SplitQueue({
      memory: q.memory,
      size: q.size,
      descTable: q.descTable,
      availRing: q.availRing,
      usedRing: q.usedRing,
      maxSize: this.maxQueueSize,
      eventIdx: this.hasFeature(VIRTIO_F.EVENT_IDX),
      indirect: this.hasFeature(VIRTIO_F.INDIRECT_DESC),
      ...(q.nextAvail !== undefined ? { nextAvail: q.nextAvail } : {}),
      ...(q.nextUsed !== undefined ? { nextUsed: q.nextUsed } : {}),
      // seg_max + header + status may exceed a queue size smaller than the maximum (Linux sizes
      // its indirect tables from seg_max), so chains may be as long as the device's max size.
      maxChainLength: Math.max(q.size, this.segMax + 2),
    });
    this.#queues[index] = new BlkQueueWorker(this, index, queue, q.signalUsed);
  }

  async stopQueue(index: number): Promise<number> {
    this.#checkIndex(index);
    const w = this.#queues[index];
    if (w === undefined) return 0;
    const next = await w.stop();
    this.#queues[index] = undefined;
    this.#pollHits += w.poll.hits;
    this.#pollMisses += w.poll.misses;
    return next;
  }

  queueNotify(index: number): void {
    const w = Number.isInteger(index) && index >= 0 ? this.#queues[index] : undefined;
    if (w === undefined) return; // spurious kick, or a kick for a queue that is not running
    w.drain();
  }

  async reset(): Promise<void> {
    await Promise.all(this.#queues.map((_, i) => this.stopQueue(i)));
    this.#driverFeatures = 0n;
    this.#writeback = this.#defaultWriteback;
    this.#needsReset = false;
    this.#lastError = undefined;
    this.#capacity = this.disk.sectors;
    this.#stateChanged();
  }

  onConfigChange(cb: () => void): void {
    this.#configListeners.push(cb);
  }

  /**
   * Poll windows since the device was created, over all queues (stopped ones included): `hits`
   * found a request without a kick, `misses` closed empty.
   */
  get pollCounts(): { hits: number; misses: number } {
    let hits = this.#pollHits;
    let misses = this.#pollMisses;
    for (const w of this.#queues) {
      hits += w?.poll.hits ?? 0;
      misses += w?.poll.misses ?? 0;
    }
    return { hits, misses };
  }

  /** The poll policy of running queue `index` (undefined when it is not running). */
  pollPolicy(index: number): AdaptivePoll | undefined {
    return this.#queues[index]?.poll;
  }

  /** Number of requests in flight on queue `index` (0 when it is not running). */
  inFlight(index: number): number {
    return this.#queues[index]?.queue.inFlight ?? 0;
  }

  #checkIndex(index: number): void {
    if (!Number.isInteger(index) || index < 0 || index >= this.numQueues) {
      throw new VirtioError('E_VIRTIO_STATE', `Cannot use virtio-blk queue ${index}: the device has ${this.numQueues} queue(s)`);
    }
  }

  #emitConfigChange(): void {
    for (const cb of this.#configListeners) {
      try {
        cb();
      } catch {
        // A transport's callback failing must not break the device.
      }
    }
  }

  /** @internal A queue found ring corruption: enter DEVICE_NEEDS_RESET. */
  markNeedsReset(err: VirtioError): void {
    if (this.#needsReset) return;
    this.#needsReset = true;
    this.#lastError = err;
    this.#emitConfigChange();
  }
}

/**
 * One running queue of the device: pops chains, runs requests, batches used entries. Requests
 * are reused per head index.
 */
class BlkQueueWorker implements BlkRequestHost {
  readonly device: VirtioBlkDevice;
  readonly index: number;
  readonly queue: SplitQueue;
  readonly #signal: () => void;
  readonly #reqs: (BlkRequest | undefined)[];
  #stopping = false;
  #publishScheduled = false;
  #draining = false;
  #drainAgain = false;
  readonly #idleWaiters: (() => void)[] = [];
  readonly #publishCb: () => void;
  readonly #drainCb: () => void;
  readonly #pollCb: () => void;
  readonly #poll: AdaptivePoll;
  /** A poll callback is scheduled. */
  #polling = false;
  /** The ring went empty with requests in flight: open a poll window when they complete. */
  #pollAfterIo = false;

  constructor(device: VirtioBlkDevice, index: number, queue: SplitQueue, signal: () => void) {
    this.device = device;
    this.index = index;
    this.queue = queue;
    this.#signal = signal;
    this.#reqs = new Array<BlkRequest | undefined>(queue.size).fill(undefined);
    this.#publishCb = (): void => {
      this.#publishScheduled = false;
      this.#publish();
    };
    this.#drainCb = (): void => this.drain();
    this.#pollCb = (): void => this.#pollOnce();
    this.#poll = new AdaptivePoll({ maxNs: device.pollMaxNs, ...(device.pollClock ? { clock: device.pollClock } : {}) });
  }

  // BlkRequestHost: live views of the device state.
  get disk(): DiskImage {
    return this.device.disk;
  }
  get capacity(): number {
    return this.device.capacity;
  }
  get readonly(): boolean {
    return this.device.readonly;
  }
  get writethrough(): boolean {
    return this.device.writethrough;
  }
  get discardEnabled(): boolean {
    return this.device.discardEnabled;
  }
  get writeZeroesEnabled(): boolean {
    return this.device.writeZeroesEnabled;
  }
  get maxDiscardSectors(): number {
    return MAX_DWZ_SECTORS;
  }
  get maxDiscardSeg(): number {
    return this.device.maxDiscardSeg;
  }
  get maxWriteZeroesSectors(): number {
    return MAX_DWZ_SECTORS;
  }
  get maxWriteZeroesSeg(): number {
    return this.device.maxDiscardSeg;
  }
  get serial(): Buffer {
    return this.device.serial;
  }

  /** Pops and starts every available chain (at most `size` per turn, then yields). */
  drain(): void {
    if (this.#stopping || this.device.needsReset) return;
    if (this.#draining) {
      this.#drainAgain = true; // a kick from inside a synchronous completion
      return;
    }
    this.#draining = true;
    this.#pollAfterIo = false;
    this.#poll.arrived();
    const q = this.queue;
    let budget = q.size;
    let descriptors = DRAIN_DESCRIPTOR_BUDGET;
    try {
      q.disableNotification();
      for (;;) {
        let chain = q.pop();
        while (chain !== null) {
          descriptors -= chain.descriptors; // read before start(): completion may reuse the chain
          let req = this.#reqs[chain.head];
          if (req === undefined) {
            req = new BlkRequest(this);
            this.#reqs[chain.head] = req;
          }
          req.start(chain);
          if (--budget === 0 || descriptors <= 0) {
            budget = 0;
            break;
          }
          chain = q.pop();
        }
        if (budget === 0) {
          // Fairness: a guest refilling the ring as fast as we drain must not starve the loop.
          setImmediate(this.#drainCb);
          break;
        }
        if (!this.#drainAgain && this.#poll.idle()) {
          // Keep kicks suppressed and watch the ring ourselves for a while.
          this.#startPolling();
          break;
        }
        if (!q.enableNotification() && !this.#drainAgain) break;
        this.#drainAgain = false;
        q.disableNotification();
      }
    } catch (e) {
      this.#needsReset(e, 'process');
    } finally {
      this.#draining = false;
      this.#publish(); // completions that happened synchronously (malformed chains, GET_ID...)
    }
  }

  #startPolling(): void {
    if (this.#polling) return;
    this.#polling = true;
    setImmediate(this.#pollCb);
  }

  /** The queue's poll policy (for logs and tests). */
  get poll(): AdaptivePoll {
    return this.#poll;
  }

  /** One look at the ring during a poll window. */
  #pollOnce(): void {
    this.#polling = false;
    if (this.#stopping || this.device.needsReset || this.queue.broken) return;
    try {
      const q = this.queue;
      if (q.pending() !== 0) {
        this.drain();
      } else if (q.inFlight !== 0) {
        // The disk is still working (requests that did not complete synchronously): polling
        // would only take CPU from it. Kicks back on; the window reopens when the last
        // request completes (#publish).
        this.#poll.cancel();
        this.#pollAfterIo = true;
        if (q.enableNotification()) this.drain();
      } else if (this.#poll.open()) {
        this.#startPolling();
      } else if (q.enableNotification()) {
        this.drain(); // arrived just as the window closed, before kicks were back on
      }
    } catch (e) {
      this.#needsReset(e, 'poll');
    }
  }

  /**
   * Never throw out of queueNotify or a poll (the transport's event loop): ring corruption, or
   * any unexpected failure, puts the device in DEVICE_NEEDS_RESET.
   */
  #needsReset(e: unknown, action: string): void {
    if (isVblkError(e, 'E_VIRTIO_RING')) {
      this.device.markNeedsReset(e);
      return;
    }
    const why = e instanceof Error ? e.message : String(e);
    this.device.markNeedsReset(new VirtioError('E_VIRTIO_STATE', `Cannot ${action} virtio-blk queue ${this.index}: ${why}`, {}, { cause: e }));
  }

  /** BlkRequestHost.finish: record the used entry; publish once per event-loop turn. */
  finish(head: number, usedLen: number): void {
    try {
      this.queue.addUsed(head, usedLen);
    } catch (e) {
      // Completing a head that is not in flight is a device bug; reached from a disk promise's
      // callback, a throw would be an unhandled rejection that ends the VMM. Stop the device
      // instead, visibly.
      const why = e instanceof Error ? e.message : String(e);
      this.device.markNeedsReset(new VirtioError('E_VIRTIO_STATE', `Cannot complete virtio-blk request on queue ${this.index}: ${why}`, { head }, { cause: e }));
      return;
    }
    if (this.#draining) return; // published at the end of drain()
    if (this.queue.inFlight === 0 && !this.#publishScheduled) {
      // Nothing else can join this batch: publish now rather than one loop turn later (QD1 latency).
      this.#publish();
      return;
    }
    if (!this.#publishScheduled) {
      this.#publishScheduled = true;
      setImmediate(this.#publishCb);
    }
  }

  #publish(): void {
    const q = this.queue;
    if (q.pendingUsed !== 0 && q.publishUsed()) {
      try {
        this.#signal();
      } catch {
        // A failing interrupt path must not lose completions; the next batch signals again.
      }
    }
    if (this.#pollAfterIo && q.inFlight === 0 && !this.#draining && !this.#stopping) {
      this.#pollAfterIo = false;
      // Kicks are on here (the ring went empty with requests in flight); polling still finds
      // the next request sooner than a kick and a wake-up would.
      if (this.#poll.idle()) this.#startPolling();
    }
    if (q.inFlight === 0 && this.#idleWaiters.length > 0) {
      for (const w of this.#idleWaiters.splice(0)) w();
    }
  }

  /** Stops popping, waits for in-flight requests, publishes; resolves to the next avail index. */
  async stop(): Promise<number> {
    this.#stopping = true;
    // A drain cut short by its budget left kicks suppressed (NO_NOTIFY, or avail_event behind
    // the ring). Whoever runs this ring next (a restarted queue, another vhost-user backend)
    // must get the driver's kicks again, so leave the ring asking for them.
    this.queue.enableNotification();
    if (this.queue.inFlight > 0 || this.queue.pendingUsed > 0) {
      await new Promise<void>((resolve) => {
        this.#idleWaiters.push(resolve);
        if (!this.#publishScheduled) {
          this.#publishScheduled = true;
          setImmediate(this.#publishCb);
        }
      });
    }
    return this.queue.nextAvail;
  }
}
