import { TransportError, hex } from '../../errors';
import { FLAGS, HEADER_SIZE, MAX_CONFIG_SIZE, MAX_MEM_REGIONS, MAX_PAYLOAD, requestName } from './protocol';

/**
 * The vhost-user message codec: framing of the byte stream (header, then `size` payload bytes,
 * with the descriptors that arrived alongside), payload decoders that check every length before
 * reading, and reply encoders. Pure: no sockets, no memory mapping.
 */

/** One message from the front-end. */
export interface VhostUserMessage {
  readonly request: number;
  readonly flags: number;
  /** Exactly `size` bytes (a copy: safe to keep). */
  readonly payload: Buffer;
  /** Descriptors received with the message (SCM_RIGHTS); the receiver owns and must close them. */
  readonly fds: number[];
}

function protocolError(message: string, data: Record<string, unknown> = {}): TransportError {
  return new TransportError('E_VHOST_PROTOCOL', message, data);
}

/**
 * Reassembles messages from stream chunks (the results of successive recvmsg calls).
 *
 * Descriptor attribution: the front-end sends each message (with its descriptors) in one
 * sendmsg. On a Unix stream socket a recvmsg may return data of several sends, but it stops right
 * after the first one that carries descriptors; so descriptors that arrive with a chunk belong to
 * the LAST message that starts inside that chunk. The decoder remembers each chunk's stream range
 * and hands its descriptors to that message once it is complete.
 *
 * @example
 *   const d = new MessageDecoder();
 *   for (const m of d.push(chunk, fds)) handle(m);
 */
export class MessageDecoder {
  #buf: Buffer = Buffer.alloc(0);
  /** Stream offset of #buf[0]. */
  #base = 0;
  #pendingFds: { start: number; end: number; fds: number[] }[] = [];

  /**
   * Appends a chunk (copied) and returns every message it completes.
   * @throws TransportError E_VHOST_PROTOCOL on a bad version or an oversized payload: the stream
   *   is unusable afterwards (the caller closes the connection and `takeFds()` to close them).
   */
  push(chunk: Uint8Array, fds: readonly number[] = []): VhostUserMessage[] {
    const start = this.#base + this.#buf.length;
    if (fds.length > 0) this.#pendingFds.push({ start, end: start + chunk.length, fds: [...fds] });
    this.#buf = this.#buf.length === 0 ? Buffer.from(chunk) : Buffer.concat([this.#buf, chunk]);
    const out: VhostUserMessage[] = [];
    for (;;) {
      if (this.#buf.length < HEADER_SIZE) break;
      const request = this.#buf.readUInt32LE(0);
      const flags = this.#buf.readUInt32LE(4);
      const size = this.#buf.readUInt32LE(8);
      if ((flags & FLAGS.VERSION_MASK) !== FLAGS.VERSION) {
        throw protocolError(`Cannot decode vhost-user message: ${requestName(request)} has version ${flags & FLAGS.VERSION_MASK}, expected 1`, {
          request,
          flags,
        });
      }
      if (size > MAX_PAYLOAD) {
        throw protocolError(`Cannot decode vhost-user message: ${requestName(request)} payload size ${size} exceeds ${MAX_PAYLOAD}`, {
          request,
          size,
        });
      }
      const total = HEADER_SIZE + size;
      if (this.#buf.length < total) break;
      const msgStart = this.#base;
      const msgEnd = msgStart + total;
      // This message is the last one starting in a chunk when the next one starts at or after
      // the chunk's end.
      const mine: number[] = [];
      this.#pendingFds = this.#pendingFds.filter((g) => {
        if (msgStart >= g.start && msgStart < g.end && msgEnd >= g.end) {
          mine.push(...g.fds);
          return false;
        }
        return true;
      });
      out.push({ request, flags, payload: Buffer.from(this.#buf.subarray(HEADER_SIZE, total)), fds: mine });
      this.#buf = this.#buf.subarray(total);
      this.#base = msgEnd;
    }
    // Descriptors no message can claim any more (the peer sent them without a message start).
    if (this.#pendingFds.some((g) => g.end <= this.#base)) {
      throw protocolError('Cannot decode vhost-user message: file descriptors arrived without a message');
    }
    return out;
  }

  /** Bytes of an incomplete message still buffered (a disconnect now truncates it). */
  get pendingBytes(): number {
    return this.#buf.length;
  }

  /** Removes and returns descriptors not yet attached to a complete message. */
  takeFds(): number[] {
    const fds = this.#pendingFds.flatMap((g) => g.fds);
    this.#pendingFds = [];
    return fds;
  }
}

/** Encodes a message (replies from the back-end; requests in tests that play the front-end). */
export function encodeMessage(request: number, flags: number, payload: Uint8Array = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(HEADER_SIZE + payload.length);
  b.writeUInt32LE(request, 0);
  b.writeUInt32LE(flags >>> 0, 4);
  b.writeUInt32LE(payload.length, 8);
  b.set(payload, HEADER_SIZE);
  return b;
}

/** A reply: version 1 with the REPLY flag. */
export function encodeReply(request: number, payload: Uint8Array): Buffer {
  return encodeMessage(request, FLAGS.VERSION | FLAGS.REPLY, payload);
}

function need(m: VhostUserMessage, n: number, what: string): void {
  if (m.payload.length < n) {
    throw protocolError(`Cannot decode ${requestName(m.request)}: ${what} needs ${n} payload bytes, got ${m.payload.length}`, {
      request: m.request,
      size: m.payload.length,
    });
  }
}

/** A u64 payload. */
export function decodeU64(m: VhostUserMessage): bigint {
  need(m, 8, 'a u64');
  return m.payload.readBigUInt64LE(0);
}

export function encodeU64(v: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt.asUintN(64, v));
  return b;
}

/** A vring state description: index (u32), num (u32). */
export interface VringState {
  readonly index: number;
  readonly num: number;
}

export function decodeVringState(m: VhostUserMessage): VringState {
  need(m, 8, 'a vring state');
  return { index: m.payload.readUInt32LE(0), num: m.payload.readUInt32LE(4) };
}

export function encodeVringState(s: VringState): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32LE(s.index, 0);
  b.writeUInt32LE(s.num, 4);
  return b;
}

/** A vring address description; ring addresses are front-end user addresses. */
export interface VringAddr {
  readonly index: number;
  readonly flags: number;
  readonly desc: bigint;
  readonly used: bigint;
  readonly avail: bigint;
  readonly log: bigint;
}

export function decodeVringAddr(m: VhostUserMessage): VringAddr {
  need(m, 40, 'a vring address');
  const p = m.payload;
  return {
    index: p.readUInt32LE(0),
    flags: p.readUInt32LE(4),
    desc: p.readBigUInt64LE(8),
    used: p.readBigUInt64LE(16),
    avail: p.readBigUInt64LE(24),
    log: p.readBigUInt64LE(32),
  };
}

export function encodeVringAddr(a: VringAddr): Buffer {
  const b = Buffer.alloc(40);
  b.writeUInt32LE(a.index, 0);
  b.writeUInt32LE(a.flags, 4);
  b.writeBigUInt64LE(a.desc, 8);
  b.writeBigUInt64LE(a.used, 16);
  b.writeBigUInt64LE(a.avail, 24);
  b.writeBigUInt64LE(a.log, 32);
  return b;
}

/** One region of SET_MEM_TABLE (u64 fields kept as bigint until range-checked). */
export interface MemRegionDesc {
  readonly guestAddr: bigint;
  readonly size: bigint;
  readonly userAddr: bigint;
  readonly mmapOffset: bigint;
}

export function decodeMemTable(m: VhostUserMessage): MemRegionDesc[] {
  need(m, 8, 'a memory table');
  const n = m.payload.readUInt32LE(0);
  if (n === 0 || n > MAX_MEM_REGIONS) {
    throw protocolError(`Cannot decode SET_MEM_TABLE: ${n} regions (expected 1..${MAX_MEM_REGIONS})`, { regions: n });
  }
  need(m, 8 + 32 * n, `${n} memory regions`);
  const out: MemRegionDesc[] = [];
  for (let i = 0; i < n; i++) {
    const o = 8 + 32 * i;
    out.push({
      guestAddr: m.payload.readBigUInt64LE(o),
      size: m.payload.readBigUInt64LE(o + 8),
      userAddr: m.payload.readBigUInt64LE(o + 16),
      mmapOffset: m.payload.readBigUInt64LE(o + 24),
    });
  }
  return out;
}

export function encodeMemTable(regions: readonly MemRegionDesc[]): Buffer {
  const b = Buffer.alloc(8 + 32 * regions.length);
  b.writeUInt32LE(regions.length, 0);
  regions.forEach((r, i) => {
    const o = 8 + 32 * i;
    b.writeBigUInt64LE(r.guestAddr, o);
    b.writeBigUInt64LE(r.size, o + 8);
    b.writeBigUInt64LE(r.userAddr, o + 16);
    b.writeBigUInt64LE(r.mmapOffset, o + 24);
  });
  return b;
}

/** A device config-space access: offset, size, flags, then `size` bytes. */
export interface ConfigAccess {
  readonly offset: number;
  readonly size: number;
  readonly flags: number;
  readonly data: Buffer;
}

export function decodeConfig(m: VhostUserMessage): ConfigAccess {
  need(m, 12, 'a config access');
  const offset = m.payload.readUInt32LE(0);
  const size = m.payload.readUInt32LE(4);
  const flags = m.payload.readUInt32LE(8);
  if (size > MAX_CONFIG_SIZE || offset > MAX_CONFIG_SIZE || offset + size > MAX_CONFIG_SIZE) {
    throw protocolError(`Cannot decode ${requestName(m.request)}: range ${hex(offset)}+${size} is outside the ${MAX_CONFIG_SIZE}-byte config space`, {
      offset,
      size,
    });
  }
  need(m, 12 + size, `a ${size}-byte config access`);
  return { offset, size, flags, data: Buffer.from(m.payload.subarray(12, 12 + size)) };
}

export function encodeConfig(c: { offset: number; flags: number; data: Uint8Array }): Buffer {
  const b = Buffer.alloc(12 + c.data.length);
  b.writeUInt32LE(c.offset, 0);
  b.writeUInt32LE(c.data.length, 4);
  b.writeUInt32LE(c.flags, 8);
  b.set(c.data, 12);
  return b;
}
