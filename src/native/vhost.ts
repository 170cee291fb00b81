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
import { closeQuietly } from './close-quietly';

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

/**
 * Readiness notifications for raw descriptors, delivered on the event loop.
 *
 * An `eventfd` registration (kick fds) is drained by the native thread and reported once per
 * wake-up; a `oneshot` registration (sockets) is reported once and stays silent until `rearm`.
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
    this.#pipe = new net.Socket({ fd: pipeFd, readable: true, writable: false });
    this.#pipe.on('data', (chunk: Buffer) => {
      // Tokens are written atomically (4 bytes < PIPE_BUF), but keep a partial one just in case.
      const data = this.#rest.length > 0 ? Buffer.concat([this.#rest, chunk]) : chunk;
      const whole = data.length - (data.length % 4);
      for (let off = 0; off < whole; off += 4) onToken(data.readUInt32LE(off));
      this.#rest = whole === data.length ? EMPTY : Buffer.from(data.subarray(whole));
    });
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


/** A close-on-exec duplicate of `fd` (same open file description). */
export function dupFd(fd: number): number {
  return checkErrno(callI64('vblk', 'vblk_vu_dup', [arg.i32(fd)]), `duplicate fd ${fd}`);
}

/** The shape of Node's internal pipe_wrap binding that `watchEventfd` uses. */
interface PipeHandle {
  open(fd: number): number;
}
interface PipeWrapBinding {
  Pipe: new (type: number) => PipeHandle;
  constants: { SOCKET: number };
}

let pipeWrap: PipeWrapBinding | null | undefined;

function loadPipeWrap(): PipeWrapBinding | null {
  if (pipeWrap !== undefined) return pipeWrap;
  pipeWrap = null;
  try {
    const binding = (process as unknown as { binding?: (name: string) => unknown }).binding;
    const b = typeof binding === 'function' ? binding.call(process, 'pipe_wrap') : undefined;
    if (typeof b === 'object' && b !== null && 'Pipe' in b && 'constants' in b) {
      const c = (b as { constants: unknown }).constants;
      if (typeof (b as { Pipe: unknown }).Pipe === 'function' && typeof c === 'object' && c !== null && typeof (c as { SOCKET?: unknown }).SOCKET === 'number') {
        pipeWrap = b as PipeWrapBinding;
      }
    }
  } catch {
    pipeWrap = null;
  }
  return pipeWrap;
}

/**
 * Watches an eventfd directly on the event loop (libuv's epoll, no native thread and no pipe
 * hop): every wake-up reads (drains) the 8-byte counter and calls `onEvent` in the same tick.
 * `net.Socket({ fd })` refuses an eventfd, so the fd is opened through Node's internal
 * `pipe_wrap` binding, which libuv reads like any stream. libuv owns a duplicate of `fd` (closed
 * when the watch ends); the caller keeps `fd`.
 *
 * Measured with a host-side QD1 front-end (docs/review-h9.md): this removes one thread wake-up per
 * kick against the poller thread, the largest single cost of a 4 KiB request.
 *
 * @returns a function that stops the watch (after it returns no further `onEvent` call happens),
 *   or undefined when this Node has no usable pipe_wrap binding (use `Poller` instead).
 */
export function watchEventfd(fd: number, onEvent: () => void): (() => void) | undefined {
  const pw = loadPipeWrap();
  if (pw === null) return undefined;
  const dup = dupFd(fd);
  let live = true;
  let socket: net.Socket;
  try {
    const handle = new pw.Pipe(pw.constants.SOCKET);
    if (handle.open(dup) !== 0) throw new Error('uv_pipe_open failed');
    // `onread` hands each read straight to the callback in a fixed buffer: no 64 KiB allocation
    // per read and none of the Readable stream machinery a 'data' listener would run per kick.
    const onread = {
      buffer: Buffer.alloc(64),
      callback: (): void => {
        if (live) onEvent();
      },
    };
    socket = new net.Socket({ handle, readable: true, writable: false, onread } as net.SocketConstructorOpts);
  } catch {
    try {
      closeQuietly(dup);
    } finally {
      pipeWrap = null; // do not try again: fall back to the poller from now on
    }
    return undefined;
  }
  socket.on('error', () => {
    // An eventfd read fails only when the watch is being torn down.
  });
  return () => {
    live = false;
    socket.destroy();
  };
}
