/**
 * Typed wrappers over the vhost-user part of the native shim (`native-bindings/vhost_shim.c`):
 * Unix sockets whose descriptors we own, recvmsg/sendmsg with SCM_RIGHTS, and a readiness
 * `Poller` (one native epoll thread per server, events delivered to Node through a pipe).
 *
 * None of this is on the per-request path: a guest kick reaches JavaScript as a 4-byte token on
 * the poller's pipe (read by an ordinary net.Socket), guest memory is a zero-copy Buffer, and the
 * call eventfds are written with `fs.writeSync`. FFI calls happen only for protocol messages
 * (a few dozen per connection) and (de)registration of descriptors.
 */
import * as net from 'node:net';
import { arg, callI64, checkErrno } from './library';
import { TransportError } from '../errors';

const EAGAIN = 11;
const EMPTY = Buffer.alloc(0);
/** Most descriptors one vhost-user message may carry (SET_MEM_TABLE: 8 regions). */
export const MAX_MESSAGE_FDS = 16;

function errnoOf(r: bigint): number {
  return r < 0n ? Number(-r) : 0;
}

/**
 * Creates a non-blocking listening Unix socket bound to `path` (which must not exist).
 * @returns the listening fd (close it with `fs.closeSync`).
 */
export function listenUnix(path: string, backlog = 1): number {
  return checkErrno(callI64('vblk', 'vblk_vu_listen', [arg.string(path), arg.i32(backlog)]), `listen on ${path}`);
}

/** Accepts one pending connection (non-blocking); undefined when none is waiting. */
export function acceptConnection(listenFd: number): number | undefined {
  const r = callI64('vblk', 'vblk_vu_accept', [arg.i32(listenFd)]);
  if (errnoOf(r) === EAGAIN) return undefined;
  return checkErrno(r, `accept on fd ${listenFd}`);
}

/** Connects a blocking Unix stream socket to `path` (tests use it to play the front-end). */
export function connectUnix(path: string): number {
  return checkErrno(callI64('vblk', 'vblk_vu_connect', [arg.string(path)]), `connect to ${path}`);
}

/** One recvmsg result: bytes read into the caller's buffer and the descriptors that came with them. */
export interface Received {
  /** 0 means the peer closed the connection. */
  readonly bytes: number;
  readonly fds: number[];
}

/**
 * Non-blocking recvmsg into `buf`; undefined when nothing is ready (EAGAIN).
 * Received descriptors are close-on-exec and now belong to the caller.
 * @throws TransportError E_NATIVE on a socket error (ECONNRESET…) or truncated ancillary data.
 */
export function receiveWithFds(fd: number, buf: Buffer): Received | undefined {
  const fdBuf = Buffer.alloc(4 * MAX_MESSAGE_FDS);
  const countBuf = Buffer.alloc(4);
  const r = callI64('vblk', 'vblk_vu_recv', [
    arg.i32(fd),
    arg.buffer(buf),
    arg.i64(buf.length),
    arg.buffer(fdBuf),
    arg.i32(MAX_MESSAGE_FDS),
    arg.buffer(countBuf),
  ]);
  if (errnoOf(r) === EAGAIN) return undefined;
  const bytes = checkErrno(r, `receive on fd ${fd}`);
  const n = countBuf.readInt32LE(0);
  const fds: number[] = [];
  for (let i = 0; i < n && i < MAX_MESSAGE_FDS; i++) fds.push(fdBuf.readInt32LE(4 * i));
  return { bytes, fds };
}

/**
 * Sends as much of `buf` as the socket takes now, `fds` attached to its first byte (SCM_RIGHTS);
 * no SIGPIPE. Never waits: on a non-blocking socket whose buffer is full it returns how many
 * bytes went (0 when none did; the descriptors went only if some bytes did). A blocking socket
 * takes all of it.
 */
export function sendWithFds(fd: number, buf: Uint8Array, fds: readonly number[] = []): number {
  if (fds.length > MAX_MESSAGE_FDS) throw new RangeError(`too many descriptors: ${fds.length}`);
  const fdBuf = Buffer.alloc(4 * Math.max(1, fds.length));
  fds.forEach((f, i) => fdBuf.writeInt32LE(f, 4 * i));
  const r = callI64('vblk', 'vblk_vu_send', [arg.i32(fd), arg.buffer(buf), arg.i64(buf.length), arg.buffer(fdBuf), arg.i32(fds.length)]);
  if (errnoOf(r) === EAGAIN) return 0;
  return checkErrno(r, `send on fd ${fd}`);
}

/** How the poller treats a descriptor: drain an eventfd counter, or report a socket once. */
export type PollMode = 'eventfd' | 'oneshot';

/** Bytes of tokens one read of the poller pipe takes (256 tokens). */
const TOKEN_READ_BYTES = 1024;

/**
 * Readiness notifications for raw descriptors, delivered on the event loop.
 *
 * An `eventfd` registration (kick fds) is drained by the native thread and reported once per
 * wake-up. Kicks take this hop because Node has no public way to watch an eventfd on its own
 * loop: `net.Socket({ fd })` refuses one (ERR_INVALID_FD_TYPE: libuv sees an anonymous inode)
 * and the pipe_wrap binding that could is deprecated (DEP0111); the thread pool would hold a
 * thread per queue. The hop costs one thread wake-up per kick (about 10 µs at queue depth 1,
 * host-side); adaptive polling avoids most kicks under load. A `oneshot` registration (sockets) is reported once and stays silent until `rearm`.
 * Tokens are caller-chosen u32s; a token that arrives after `remove` is simply a stale token
 * (the caller ignores unknown tokens), and after `remove` returns the native thread never touches
 * the fd again, so it may be closed at once.
 *
 * @example
 *   const p = new Poller((token) => console.log('ready', token));
 *   p.add(kickFd, 7, 'eventfd');
 *   ...
 *   p.remove(kickFd); fs.closeSync(kickFd); p.close();
 */
export class Poller {
  readonly #id: number;
  readonly #pipe: net.Socket;
  #rest: Buffer = EMPTY;
  #closed = false;

  /** @param onToken called on the event loop for every readiness token. */
  constructor(onToken: (token: number) => void) {
    this.#id = checkErrno(callI64('vblk', 'vblk_poller_create', []), 'create a poller thread');
    const pipeFd = checkErrno(callI64('vblk', 'vblk_poller_pipe', [arg.i32(this.#id)]), 'get the poller pipe');
    // `onread` hands each read to us in one fixed buffer: no allocation and none of the Readable
    // stream machinery per wake-up (a guest kick is one of these).
    const buffer = Buffer.alloc(TOKEN_READ_BYTES);
    const onread = {
      buffer,
      callback: (n: number): void => {
        if (this.#rest.length === 0 && n % 4 === 0) {
          // The usual case (a kick is one of these): whole tokens, read in place.
          for (let off = 0; off < n; off += 4) onToken(buffer.readUInt32LE(off));
          return;
        }
        // Tokens are written atomically (4 bytes < PIPE_BUF), but keep a partial one just in case.
        const chunk = buffer.subarray(0, n);
        const data = this.#rest.length > 0 ? Buffer.concat([this.#rest, chunk]) : chunk;
        const whole = data.length - (data.length % 4);
        for (let off = 0; off < whole; off += 4) onToken(data.readUInt32LE(off));
        this.#rest = whole === data.length ? EMPTY : Buffer.from(data.subarray(whole));
      },
    };
    // (Node has supported `onread` since v12; @types/node 20 leaves it out of the options type.)
    const opts: net.SocketConstructorOpts & { onread: typeof onread } = { fd: pipeFd, readable: true, writable: false, onread };
    this.#pipe = new net.Socket(opts);
    this.#pipe.on('error', () => {
      // The pipe only fails when the poller is being destroyed.
    });
  }

  /** Starts watching `fd`. */
  add(fd: number, token: number, mode: PollMode): void {
    this.#checkOpen();
    checkErrno(
      callI64('vblk', 'vblk_poller_add', [arg.i32(this.#id), arg.i32(fd), arg.i32(token >>> 0), arg.i32(mode === 'eventfd' ? 1 : 2)]),
      `watch fd ${fd}`,
    );
  }

  /**
   * Re-enables a `oneshot` registration for one more report: when the descriptor is readable
   * (the default: after it has been drained), writable (output is waiting), or either.
   */
  rearm(fd: number, token: number, interest: { readable?: boolean; writable?: boolean } = { readable: true }): void {
    this.#checkOpen();
    const bits = (interest.readable === true ? 1 : 0) | (interest.writable === true ? 2 : 0);
    if (bits === 0) throw new RangeError('rearm needs readable, writable or both');
    checkErrno(callI64('vblk', 'vblk_poller_rearm', [arg.i32(this.#id), arg.i32(fd), arg.i32(token >>> 0), arg.i32(bits)]), `re-arm fd ${fd}`);
  }

  /** Stops watching `fd` (no-op when it is not watched). */
  remove(fd: number): void {
    if (this.#closed) return;
    const r = callI64('vblk', 'vblk_poller_del', [arg.i32(this.#id), arg.i32(fd)]);
    if (r < 0n && errnoOf(r) !== 2 /* ENOENT */) checkErrno(r, `stop watching fd ${fd}`);
  }

  /** Stops the native thread and closes the pipe. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    checkErrno(callI64('vblk', 'vblk_poller_destroy', [arg.i32(this.#id)]), 'stop the poller thread');
    this.#pipe.destroy();
  }

  #checkOpen(): void {
    if (this.#closed) throw new TransportError('E_NATIVE', 'Cannot use the poller: it is closed');
  }
}


