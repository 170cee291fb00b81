import * as fs from 'node:fs';
import { TransportError, isVblkError } from '../../errors';
import type { VirtioDevice } from '../../virtio/device';
import type { VhostUserMessage } from './codec';
import {
  decodeConfig,
  decodeMemTable,
  decodeU64,
  decodeVringAddr,
  decodeVringState,
  encodeConfig,
  encodeReply,
  encodeU64,
  encodeVringState,
} from './codec';
import type { VringAddr } from './codec';
import { MemoryTable } from './memory-table';
import type { RegionMapper } from './memory-table';
import { FLAGS, PROTOCOL_F, VHOST_F_LOG_ALL, VHOST_USER, VHOST_USER_F_PROTOCOL_FEATURES, VRING_INDEX_MASK, VRING_NOFD_MASK, requestName } from './protocol';
import { closeQuietly } from '../../native/close-quietly';

/** What the back-end needs from its surroundings (injected so tests can observe it). */
export interface BackendEnv {
  /** Maps a memory region's fd (the server uses mmap through native/libc). */
  readonly mapper: RegionMapper;
  /**
   * Delivers every kick of eventfd `fd` to `onKick` on the event loop; returns a function that
   * stops the delivery, after which `fd` may be closed.
   */
  watchKick(fd: number, onKick: () => void): () => void;
  /** One-line log (protocol errors, unknown requests). */
  log(line: string): void;
}

/** Protocol features vblk offers. */
export const OFFERED_PROTOCOL_FEATURES =
  (1n << PROTOCOL_F.MQ) | (1n << PROTOCOL_F.REPLY_ACK) | (1n << PROTOCOL_F.CONFIG) | (1n << PROTOCOL_F.RESET_DEVICE);

/** Requests whose reply is mandatory: if they fail the front-end would wait forever, so we close. */
const MUST_REPLY = new Set<number>([
  VHOST_USER.GET_FEATURES,
  VHOST_USER.GET_PROTOCOL_FEATURES,
  VHOST_USER.GET_VRING_BASE,
  VHOST_USER.GET_QUEUE_NUM,
  VHOST_USER.GET_CONFIG,
]);

/** The result of handling one message. */
export interface HandleResult {
  /** Bytes to send back (a reply or a REPLY_ACK), if any. */
  readonly reply?: Buffer;
  /** The connection must be closed (a mandatory reply could not be produced). */
  readonly close?: boolean;
}

const EIGHT_BYTE_ONE = (() => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(1n);
  return b;
})();

/** Sessions alive per device, for the single config-change listener each device gets. */
const liveBackends = new WeakMap<VirtioDevice, Set<VhostUserBackend>>();

/** Per-vring state (vhost-user.rst "Ring states": stopped / started+disabled / started+enabled). */
class Vring {
  num = 0;
  addr: VringAddr | undefined;
  base = 0;
  kickFd: number | undefined;
  callFd: number | undefined;
  errFd: number | undefined;
  /** A kick fd (or the no-fd flag) arrived since the last GET_VRING_BASE. */
  started = false;
  enabled = false;
  /** The device queue is running. */
  running = false;
  /** Kicks received since the session started. */
  kicks = 0;
  unwatch: (() => void) | undefined;
  readonly signal: () => void;

  constructor() {
    this.signal = (): void => {
      const fd = this.callFd;
      if (fd === undefined) return;
      try {
        fs.writeSync(fd, EIGHT_BYTE_ONE);
      } catch {
        // EAGAIN would mean a counter near 2^64; a closed fd means we are tearing down.
      }
    };
  }
}

function failure(message: string, data: Record<string, unknown> = {}): TransportError {
  return new TransportError('E_VHOST_PROTOCOL', message, data);
}

/**
 * The back-end side of the vhost-user protocol for one connection, over any `VirtioDevice`.
 *
 * Messages are handled strictly in order (the caller awaits each `handle`). Requests that fail
 * are logged in one line; the front-end learns of it through REPLY_ACK when it asked for an ack,
 * and a request whose reply is mandatory closes the connection instead of leaving the front-end
 * waiting. The device's queues run only while a ring is started, enabled, sized, addressed and
 * memory is mapped; GET_VRING_BASE stops the queue after its in-flight requests complete.
 *
 * @example
 *   const be = new VhostUserBackend(device, env);
 *   const { reply, close } = await be.handle(message);
 *   ...
 *   await be.shutdown(); // on disconnect: drain, unmap, close fds
 */
export class VhostUserBackend {
  readonly device: VirtioDevice;
  readonly #env: BackendEnv;
  readonly #vrings: Vring[];
  #features = 0n;
  #protocolFeatures = 0n;
  #featuresSet = false;
  #owner = false;
  #table: MemoryTable | undefined;
  #closed = false;

  constructor(device: VirtioDevice, env: BackendEnv) {
    this.device = device;
    this.#env = env;
    this.#vrings = Array.from({ length: device.numQueues }, () => new Vring());
    // One device outlives many sessions and has no way to remove a listener: register once per
    // device and fan out to the sessions alive at the time.
    let live = liveBackends.get(device);
    if (live === undefined) {
      const set = new Set<VhostUserBackend>();
      live = set;
      liveBackends.set(device, set);
      device.onConfigChange(() => {
        for (const b of set) b.#configChanged();
      });
    }
    live.add(this);
  }

  #configChanged(): void {
    if (this.#closed || !this.device.needsReset) return;
    this.#env.log('vhost-user: device needs reset (ring corruption); signalling the error fds');
    for (const v of this.#vrings) {
      if (v.errFd !== undefined) {
        try {
          fs.writeSync(v.errFd, EIGHT_BYTE_ONE);
        } catch {
          // best effort
        }
      }
    }
  }

  /** Features offered in GET_FEATURES: the device's plus PROTOCOL_FEATURES. */
  get offeredFeatures(): bigint {
    return this.device.deviceFeatures | (1n << VHOST_USER_F_PROTOCOL_FEATURES);
  }

  get protocolFeatures(): bigint {
    return this.#protocolFeatures;
  }

  /** The mapped guest memory, if SET_MEM_TABLE succeeded. */
  get memoryTable(): MemoryTable | undefined {
    return this.#table;
  }

  /** Kicks received per queue in this session (for logs: shows which queues the driver used). */
  get kickCounts(): number[] {
    return this.#vrings.map((v) => v.kicks);
  }

  /** True while queue `index` is running in the device. */
  isRunning(index: number): boolean {
    return this.#vrings[index]?.running ?? false;
  }

  #hasProtocol(bit: bigint): boolean {
    return (this.#protocolFeatures & (1n << bit)) !== 0n;
  }

  /**
   * Handles one message: never throws for anything the front-end sent (the error is logged and
   * reported as the result says). Closes the message's fds that were not kept.
   */
  async handle(m: VhostUserMessage): Promise<HandleResult> {
    const kept = new Set<number>();
    const wantsAck = (m.flags & FLAGS.NEED_REPLY) !== 0 && this.#hasProtocol(PROTOCOL_F.REPLY_ACK);
    try {
      if (this.#closed) throw failure(`Cannot handle ${requestName(m.request)}: the back-end is shut down`);
      const reply = await this.#dispatch(m, kept);
      if (reply !== undefined) return { reply: encodeReply(m.request, reply) };
      return wantsAck ? { reply: encodeReply(m.request, encodeU64(0n)) } : {};
    } catch (e) {
      const msg = e instanceof Error ? e.message : String(e);
      // Anything but a typed error is a bug of ours: still never crash the server, but say where.
      const where = !isVblkError(e) && e instanceof Error && e.stack ? ` (internal error ${e.stack.split('\n')[1]?.trim() ?? ''})` : '';
      this.#env.log(`vhost-user: ${requestName(m.request)} failed: ${msg}${where}`);
      if (MUST_REPLY.has(m.request)) return { close: true };
      return wantsAck ? { reply: encodeReply(m.request, encodeU64(1n)) } : {};
    } finally {
      for (const fd of m.fds) if (!kept.has(fd)) closeQuietly(fd);
    }
  }

  #vring(index: number, request: number): Vring {
    const v = Number.isInteger(index) ? this.#vrings[index] : undefined;
    if (v === undefined) {
      throw failure(`Cannot handle ${requestName(request)}: vring ${index} does not exist (the device has ${this.#vrings.length})`, { index });
    }
    return v;
  }

  async #dispatch(m: VhostUserMessage, kept: Set<number>): Promise<Buffer | undefined> {
    const R = VHOST_USER;
    switch (m.request) {
      case R.GET_FEATURES:
        return encodeU64(this.offeredFeatures);
      case R.SET_FEATURES: {
        const f = decodeU64(m);
        const unknown = f & ~(this.offeredFeatures | (1n << VHOST_F_LOG_ALL));
        if (unknown !== 0n) throw failure(`Cannot set features: bits 0x${unknown.toString(16)} were not offered`);
        if ((f & (1n << VHOST_F_LOG_ALL)) !== 0n) throw failure('Cannot set features: dirty logging (VHOST_F_LOG_ALL) is not supported');
        const virtio = f & ~(1n << VHOST_USER_F_PROTOCOL_FEATURES);
        if (!this.device.setDriverFeatures(virtio)) throw failure(`Cannot set features: the device refused 0x${virtio.toString(16)}`);
        this.#features = f;
        this.#featuresSet = true;
        return undefined;
      }
      case R.GET_PROTOCOL_FEATURES:
        return encodeU64(OFFERED_PROTOCOL_FEATURES);
      case R.SET_PROTOCOL_FEATURES: {
        const f = decodeU64(m);
        this.#protocolFeatures = f & OFFERED_PROTOCOL_FEATURES;
        if (f !== this.#protocolFeatures) {
          this.#env.log(`vhost-user: ignoring protocol feature bits 0x${(f & ~OFFERED_PROTOCOL_FEATURES).toString(16)} that were not offered`);
        }
        return undefined;
      }
      case R.SET_OWNER:
        this.#owner = true;
        return undefined;
      case R.RESET_OWNER:
        // Deprecated; the spec recommends disabling all rings and keeping the session.
        await this.#stopAll();
        return undefined;
      case R.RESET_DEVICE:
        await this.#resetDevice();
        return undefined;
      case R.SET_MEM_TABLE:
        await this.#setMemTable(m);
        return undefined;
      case R.SET_VRING_NUM: {
        const s = decodeVringState(m);
        const v = this.#vring(s.index, m.request);
        const max = this.device.maxQueueSize;
        if (s.num < 1 || s.num > max || (s.num & (s.num - 1)) !== 0) {
          throw failure(`Cannot set vring ${s.index} size: ${s.num} is not a power of two in 1..${max}`, { num: s.num });
        }
        if (v.running) throw failure(`Cannot set vring ${s.index} size: the ring is running`);
        // Addresses checked for the old size must still fit the new one (fail this message, not a
        // later kick).
        if (v.addr !== undefined && this.#table !== undefined) this.#translate(v, v.addr, s.num);
        v.num = s.num;
        return undefined;
      }
      case R.SET_VRING_ADDR: {
        const a = decodeVringAddr(m);
        const v = this.#vring(a.index, m.request);
        // Check now, so a bad address fails this message (REPLY_ACK) and not a later kick.
        this.#translate(v, a);
        if (v.running) await this.#stopQueue(a.index, v);
        v.addr = a;
        this.#maybeStart(a.index, v); // no-op unless the ring is started, enabled and sized
        return undefined;
      }
      case R.SET_VRING_BASE: {
        const s = decodeVringState(m);
        const v = this.#vring(s.index, m.request);
        if (s.num > 0xffff) throw failure(`Cannot set vring ${s.index} base: ${s.num} is not a split-ring index (0..65535)`, { num: s.num });
        if (v.running) throw failure(`Cannot set vring ${s.index} base: the ring is running`);
        v.base = s.num;
        return undefined;
      }
      case R.GET_VRING_BASE: {
        const s = decodeVringState(m);
        const v = this.#vring(s.index, m.request);
        if (v.running) await this.#stopQueue(s.index, v);
        v.started = false;
        this.#dropKick(v);
        if (v.callFd !== undefined) closeQuietly(v.callFd);
        v.callFd = undefined;
        return encodeVringState({ index: s.index, num: v.base });
      }
      case R.SET_VRING_KICK:
      case R.SET_VRING_CALL:
      case R.SET_VRING_ERR:
        this.#setVringFd(m, kept);
        return undefined;
      case R.GET_QUEUE_NUM:
        return encodeU64(BigInt(this.device.numQueues));
      case R.SET_VRING_ENABLE: {
        const s = decodeVringState(m);
        const v = this.#vring(s.index, m.request);
        if (s.num > 1) throw failure(`Cannot enable vring ${s.index}: value ${s.num} is not 0 or 1`);
        v.enabled = s.num === 1;
        if (v.enabled) this.#maybeStart(s.index, v);
        else if (v.running) await this.#stopQueue(s.index, v);
        return undefined;
      }
      case R.GET_CONFIG: {
        const c = decodeConfig(m);
        const out = Buffer.alloc(c.size);
        this.device.readConfig(c.offset, out);
        return encodeConfig({ offset: c.offset, flags: c.flags, data: out });
      }
      case R.SET_CONFIG: {
        const c = decodeConfig(m);
        this.device.writeConfig(c.offset, c.data);
        return undefined;
      }
      default:
        throw failure(`Cannot handle ${requestName(m.request)}: not supported by vblk (no protocol feature announced it)`, {
          request: m.request,
        });
    }
  }

  #setVringFd(m: VhostUserMessage, kept: Set<number>): void {
    const u = decodeU64(m);
    if ((u & ~(VRING_INDEX_MASK | VRING_NOFD_MASK)) !== 0n) throw failure(`Cannot decode ${requestName(m.request)}: reserved bits set in 0x${u.toString(16)}`);
    const index = Number(u & VRING_INDEX_MASK);
    const nofd = (u & VRING_NOFD_MASK) !== 0n;
    const v = this.#vring(index, m.request);
    if (!nofd && m.fds.length !== 1) throw failure(`Cannot handle ${requestName(m.request)} for vring ${index}: expected 1 file descriptor, got ${m.fds.length}`);
    if (nofd && m.fds.length !== 0) throw failure(`Cannot handle ${requestName(m.request)} for vring ${index}: no-fd flag set but ${m.fds.length} descriptors sent`);
    const fd = nofd ? undefined : (m.fds[0] as number);
    if (m.request === VHOST_USER.SET_VRING_KICK) {
      if (nofd) throw failure(`Cannot handle SET_VRING_KICK for vring ${index}: polling mode (no kick fd) is not supported`);
      this.#dropKick(v);
      if (fd !== undefined) {
        let unwatch: () => void;
        try {
          unwatch = this.#env.watchKick(fd, () => {
            v.kicks++;
            if (v.running) this.device.queueNotify(index);
          });
        } catch (e) {
          // Not kept: the fd is closed with the message, and the ring waits for a working kick.
          throw failure(`Cannot watch the kick fd of vring ${index}: ${e instanceof Error ? e.message : String(e)}`);
        }
        kept.add(fd);
        v.kickFd = fd;
        v.unwatch = unwatch;
      }
      v.started = true;
      this.#maybeStart(index, v);
      return;
    }
    if (fd !== undefined) kept.add(fd);
    if (m.request === VHOST_USER.SET_VRING_CALL) {
      if (v.callFd !== undefined) closeQuietly(v.callFd);
      v.callFd = fd;
    } else {
      if (v.errFd !== undefined) closeQuietly(v.errFd);
      v.errFd = fd;
    }
  }

  #dropKick(v: Vring): void {
    if (v.unwatch) v.unwatch();
    v.unwatch = undefined;
    if (v.kickFd !== undefined) closeQuietly(v.kickFd);
    v.kickFd = undefined;
  }

  /** Guest physical addresses of a vring from its user addresses, checked against the table. */
  #translate(v: Vring, a: VringAddr, num = v.num): { desc: number; avail: number; used: number } {
    const t = this.#table;
    if (t === undefined) throw failure(`Cannot set vring ${a.index} addresses: no memory table yet (SET_MEM_TABLE first)`);
    const n = num > 0 ? num : 1;
    return {
      desc: t.userToGuest(a.desc, 16 * n, `vring ${a.index} descriptor table`),
      avail: t.userToGuest(a.avail, 6 + 2 * n, `vring ${a.index} avail ring`),
      used: t.userToGuest(a.used, 6 + 8 * n, `vring ${a.index} used ring`),
    };
  }

  /** Starts the device queue when the ring is started, enabled and fully described. */
  #maybeStart(index: number, v: Vring): void {
    const enabled = v.enabled || (this.#features & (1n << VHOST_USER_F_PROTOCOL_FEATURES)) === 0n;
    if (v.running || !v.started || !enabled || v.addr === undefined || v.num === 0 || this.#table === undefined) return;
    if (!this.#featuresSet) throw failure(`Cannot start vring ${index}: SET_FEATURES was never sent`);
    const r = this.#translate(v, v.addr);
    const memory = this.#table.memory;
    // The used index in memory is the truth the driver sees (libvhost-user does the same).
    const nextUsed = memory.readU16(r.used + 2);
    this.device.startQueue(index, {
      memory,
      size: v.num,
      descTable: r.desc,
      availRing: r.avail,
      usedRing: r.used,
      nextAvail: v.base,
      nextUsed,
      signalUsed: v.signal,
    });
    v.running = true;
    // Requests may already be waiting (the driver kicked before we were ready).
    this.device.queueNotify(index);
  }

  async #stopQueue(index: number, v: Vring): Promise<void> {
    v.running = false;
    v.base = await this.device.stopQueue(index);
  }

  async #stopAll(): Promise<void> {
    await Promise.all(this.#vrings.map((v, i) => (v.running ? this.#stopQueue(i, v) : Promise.resolve())));
  }

  async #resetDevice(): Promise<void> {
    await this.#stopAll();
    await this.device.reset();
    for (const v of this.#vrings) {
      this.#dropKick(v);
      for (const fd of [v.callFd, v.errFd]) if (fd !== undefined) closeQuietly(fd);
      v.callFd = undefined;
      v.errFd = undefined;
      v.started = false;
      v.enabled = false;
      v.addr = undefined;
      v.num = 0;
      v.base = 0;
    }
    this.#features = 0n;
    this.#featuresSet = false;
  }

  async #setMemTable(m: VhostUserMessage): Promise<void> {
    const descs = decodeMemTable(m);
    const table = MemoryTable.map(descs, m.fds, this.#env.mapper);
    // Running rings keep working across the switch: stop (drain), swap, restart from their base.
    const running = this.#vrings.map((v) => v.running);
    try {
      await this.#stopAll();
    } catch (e) {
      table.unmap();
      throw e;
    }
    const old = this.#table;
    this.#table = table;
    old?.unmap();
    for (const [i, v] of this.#vrings.entries()) {
      if (!running[i]) continue;
      try {
        this.#maybeStart(i, v);
      } catch (e) {
        this.#env.log(`vhost-user: vring ${i} cannot restart after SET_MEM_TABLE: ${e instanceof Error ? e.message : String(e)}`);
      }
    }
  }

  /**
   * Ends the session (front-end disconnected, or the server stops): waits for in-flight requests,
   * resets the device, unmaps guest memory and closes every descriptor. Idempotent.
   */
  async shutdown(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    liveBackends.get(this.device)?.delete(this);
    try {
      await this.#stopAll();
    } finally {
      try {
        await this.device.reset();
      } catch (e) {
        this.#env.log(`vhost-user: device reset failed: ${e instanceof Error ? e.message : String(e)}`);
      }
      for (const v of this.#vrings) {
        this.#dropKick(v);
        for (const fd of [v.callFd, v.errFd]) if (fd !== undefined) closeQuietly(fd);
        v.callFd = undefined;
        v.errFd = undefined;
      }
      this.#table?.unmap();
      this.#table = undefined;
    }
  }

  /** True once SET_OWNER was received. */
  get owned(): boolean {
    return this.#owner;
  }
}

