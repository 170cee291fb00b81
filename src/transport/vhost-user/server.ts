import * as fs from 'node:fs';
import { EventEmitter } from 'node:events';
import { TransportError } from '../../errors';
import type { VirtioDevice } from '../../virtio/device';
import { F_SEAL_SHRINK, bufferAt, getSeals, mmapRange, munmap } from '../../native/libc';
import { Poller, acceptConnection, listenUnix, receiveWithFds, sendWithFds } from '../../native/vhost';
import { VhostUserBackend } from './backend';
import type { BackendEnv } from './backend';
import { MessageDecoder } from './codec';
import type { VhostUserMessage } from './codec';
import type { RegionMapper } from './memory-table';
import { MAX_QUEUED_MESSAGES, requestName } from './protocol';
import { closeQuietly } from '../../native/close-quietly';

/** Options of `VhostUserServer.listen`. */
export interface VhostUserServerOptions {
  /** Path of the Unix socket to create (a stale socket there is replaced; any other file is an error). */
  readonly socketPath: string;
  readonly device: VirtioDevice;
  /** One-line log sink; default: stderr. */
  readonly log?: (line: string) => void;
  /** Region mapper; default: mmap(MAP_SHARED) through native/libc. */
  readonly mapper?: RegionMapper;
  /** Runs after each session ended and its queues drained (the CLI flushes the disk here). */
  readonly afterSession?: () => Promise<void>;
}

const TOKEN_LISTEN = 1;
const TOKEN_CONN = 2;
const FIRST_KICK_TOKEN = 16;
const RECV_CHUNK = 8192;
/**
 * Reply bytes one front-end may leave unread before it is disconnected. Replies are small
 * (a few dozen bytes; GET_CONFIG at most 256): only a peer that sends requests and never reads
 * the answers gets near this, and it must not grow our memory without bound.
 */
export const MAX_UNREAD_REPLY_BYTES = 256 * 1024;
/** Pause before accepting again after accept failed (descriptor exhaustion). */
const ACCEPT_RETRY_MS = 100;

/**
 * mmap-based region mapper (MAP_SHARED, read-write), mapping exactly the region as one
 * contiguous mapping: from the page (huge page on hugetlbfs) that holds `offset`, the bytes
 * before `offset` hidden. Touching a page past the end of the file is SIGBUS, which would kill
 * the server the first time the guest pointed a descriptor there, so:
 * - a memfd must carry F_SEAL_SHRINK, or its owner could ftruncate it after we mapped it. QEMU's
 *   memory-backend-memfd seals it (seal=on, its default); a memfd without the seal (seal=off, or
 *   a front-end that creates it without MFD_ALLOW_SEALING, as cloud-hypervisor does) is refused
 *   with a message saying so. The seals are read before the size: once sealed, the size cannot
 *   drop between the check and the mmap.
 * - a file shorter than the region is refused.
 * Other files (memory-backend-file on tmpfs or hugetlbfs, a regular file) cannot be sealed: the
 * kernel lets whoever holds them writable truncate them. Refusing them would rule out the usual
 * hugepage set-up, so they are accepted after the size check and their owner, who chose the
 * path, is trusted not to truncate them while the guest runs (libvhost-user, DPDK and SPDK trust
 * every file this way).
 */
export const mmapRegionMapper: RegionMapper = (fd, offset, length) => {
  if (isMemfd(fd)) {
    const seals = getSeals(fd) ?? 0;
    if ((seals & F_SEAL_SHRINK) === 0) {
      throw new TransportError('E_VHOST_PROTOCOL', `Cannot map fd ${fd}: it is a memfd without F_SEAL_SHRINK, so the front-end could shrink it under the mapping (seal it, as QEMU's memory-backend-memfd does with seal=on, its default)`, { fd });
    }
  }
  const st = fs.fstatSync(fd);
  if (st.isFile() && st.size < offset + length) {
    throw new TransportError('E_VHOST_PROTOCOL', `Cannot map fd ${fd}: the file has ${st.size} bytes, the region needs ${offset + length}`, { fd, fileBytes: st.size, needed: offset + length });
  }
  const granule = mappingGranule(fd, st);
  const skip = offset % granule;
  const m = mmapRange({ length: roundUp(skip + length, granule), fd, offset: offset - skip });
  return {
    view: (at, n) => {
      if (!Number.isSafeInteger(at) || !Number.isSafeInteger(n) || at < 0 || n < 1 || at + n > length) {
        throw new RangeError(`Cannot view ${n} bytes at ${at} of a ${length}-byte region`);
      }
      return bufferAt(m.address + BigInt(skip + at), n);
    },
    unmap: () => munmap(m),
  };
};

/** The base page size (x86-64). */
const PAGE_SIZE = 4096;
const HUGETLBFS_MAGIC = 0x958458f6;

/**
 * The unit mmap offsets and lengths of `fd` must be multiples of: the page, or on hugetlbfs
 * (memory-backend-file on /dev/hugepages, a MFD_HUGETLB memfd) the huge page, which the file's
 * block size is there (mmap refuses an offset, munmap a length, that is not a multiple of it).
 */
function mappingGranule(fd: number, st: fs.Stats): number {
  let type: number;
  try {
    type = fs.statfsSync(`/proc/self/fd/${fd}`).type;
  } catch {
    return PAGE_SIZE;
  }
  const b = st.blksize;
  const hugePage = type === HUGETLBFS_MAGIC && b > PAGE_SIZE && (b & (b - 1)) === 0;
  return hugePage ? b : PAGE_SIZE;
}

function roundUp(n: number, unit: number): number {
  return Math.ceil(n / unit) * unit;
}

/** True when `fd` is a memfd (its /proc link names "/memfd:..."). */
function isMemfd(fd: number): boolean {
  try {
    return fs.readlinkSync(`/proc/self/fd/${fd}`).startsWith('/memfd:');
  } catch {
    return false;
  }
}

/**
 * A vhost-user back-end server on a Unix socket: one front-end (QEMU, cloud-hypervisor…) at a
 * time; when it disconnects (even killed mid-request) the session is drained and torn down and the
 * next connection is accepted.
 *
 * Events: `connect`, `disconnect` (after the session's teardown and `afterSession`; its argument
 * `{ kicks }` holds the kicks received per queue). No `error` event by design: protocol problems
 * are logged, never thrown.
 *
 * I/O model: a native poller thread watches the listening socket, the connection socket and the
 * kick eventfds; readiness arrives as tokens on a pipe read by Node. Protocol messages are read
 * with a non-blocking recvmsg (FFI, a few dozen per session); kicks cost no FFI call; the device
 * signals completions by writing the call eventfd with `fs.writeSync`.
 *
 * @example
 *   const server = await VhostUserServer.listen({ socketPath: '/tmp/vblk.sock', device });
 *   ...
 *   await server.close();
 */
export class VhostUserServer extends EventEmitter {
  readonly socketPath: string;
  readonly device: VirtioDevice;
  readonly #log: (line: string) => void;
  readonly #mapper: RegionMapper;
  readonly #afterSession: (() => Promise<void>) | undefined;
  readonly #poller: Poller;
  readonly #listenFd: number;
  readonly #kicks = new Map<number, () => void>();
  #nextToken = FIRST_KICK_TOKEN;
  #session: Session | undefined;
  #closing: Promise<void> | undefined;
  #sessions = 0;
  #acceptFailing = false;

  private constructor(opts: VhostUserServerOptions, listenFd: number) {
    super();
    this.socketPath = opts.socketPath;
    this.device = opts.device;
    this.#log = opts.log ?? ((line: string): void => void process.stderr.write(line + '\n'));
    this.#mapper = opts.mapper ?? mmapRegionMapper;
    this.#afterSession = opts.afterSession;
    this.#listenFd = listenFd;
    this.#poller = new Poller((token) => this.#onToken(token));
    this.#poller.add(listenFd, TOKEN_LISTEN, 'oneshot');
  }

  /**
   * Creates the socket and starts accepting.
   * @throws TransportError when the path is taken by something other than a socket, or bind fails.
   */
  static listen(opts: VhostUserServerOptions): Promise<VhostUserServer> {
    // A promise (a throw below becomes its rejection), so callers need not care that binding a
    // unix socket is synchronous.
    return new Promise((resolve) => resolve(VhostUserServer.#listenNow(opts)));
  }

  static #listenNow(opts: VhostUserServerOptions): VhostUserServer {
    let st: fs.Stats | undefined;
    try {
      st = fs.lstatSync(opts.socketPath);
    } catch {
      st = undefined;
    }
    if (st !== undefined) {
      if (!st.isSocket()) {
        throw new TransportError('E_VHOST_PROTOCOL', `Cannot listen on ${opts.socketPath}: it exists and is not a socket`);
      }
      fs.unlinkSync(opts.socketPath);
    }
    const fd = listenUnix(opts.socketPath, 4);
    try {
      return new VhostUserServer(opts, fd);
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
  }

  /** True while a front-end is connected. */
  get connected(): boolean {
    return this.#session !== undefined;
  }

  /** Number of sessions accepted so far. */
  get sessions(): number {
    return this.#sessions;
  }

  /** Messages the current session has read and not yet handled (tests check the cap). */
  get backlog(): number {
    return this.#session?.backlog ?? 0;
  }

  /** The current session's back-end (tests inspect it). */
  get backend(): VhostUserBackend | undefined {
    return this.#session?.backend;
  }

  #onToken(token: number): void {
    if (this.#closing) return;
    if (token === TOKEN_LISTEN) this.#accept();
    else if (token === TOKEN_CONN) this.#session?.ready();
    else this.#kicks.get(token)?.();
  }

  #accept(): void {
    if (this.#session !== undefined) return; // re-armed when the session ends
    let fd: number | undefined;
    try {
      fd = acceptConnection(this.#listenFd);
    } catch (e) {
      // EMFILE/ENFILE leave the connection in the backlog: re-arming at once would report it
      // again at once (a busy loop). Log once per failure streak and retry after a pause.
      if (!this.#acceptFailing) this.#log(`vhost-user: accept failed (retrying every ${ACCEPT_RETRY_MS} ms): ${e instanceof Error ? e.message : String(e)}`);
      this.#acceptFailing = true;
      setTimeout(() => {
        if (!this.#closing) this.#poller.rearm(this.#listenFd, TOKEN_LISTEN);
      }, ACCEPT_RETRY_MS).unref();
      return;
    }
    if (fd === undefined) {
      this.#poller.rearm(this.#listenFd, TOKEN_LISTEN);
      return;
    }
    this.#acceptFailing = false;
    this.#sessions++;
    const env: BackendEnv = {
      mapper: this.#mapper,
      log: this.#log,
      watchKick: (kfd, onKick) => {
        const token = this.#nextToken++;
        if (this.#nextToken > 0xffff_fff0) this.#nextToken = FIRST_KICK_TOKEN;
        this.#kicks.set(token, onKick);
        this.#poller.add(kfd, token, 'eventfd');
        return () => {
          this.#kicks.delete(token);
          this.#poller.remove(kfd);
        };
      },
    };
    const session = new Session(fd, new VhostUserBackend(this.device, env), this.#poller, this.#log, () => void this.#endSession(session));
    this.#session = session;
    this.#poller.add(fd, TOKEN_CONN, 'oneshot');
    this.emit('connect');
  }

  async #endSession(session: Session): Promise<void> {
    try {
      await session.backend.shutdown();
    } catch (e) {
      this.#log(`vhost-user: session teardown failed: ${e instanceof Error ? e.message : String(e)}`);
    }
    try {
      if (this.#afterSession) await this.#afterSession();
    } catch (e) {
      this.#log(`vhost-user: after-session hook failed: ${e instanceof Error ? e.message : String(e)}`);
    }
    if (this.#session === session) this.#session = undefined;
    this.emit('disconnect', { kicks: session.backend.kickCounts });
    if (!this.#closing) {
      this.#poller.rearm(this.#listenFd, TOKEN_LISTEN);
    }
  }

  /**
   * Stops accepting, ends the current session (waiting for its in-flight requests), stops the
   * poller thread and removes the socket file. Idempotent.
   */
  close(): Promise<void> {
    if (this.#closing) return this.#closing;
    this.#closing = (async () => {
      const s = this.#session;
      if (s) {
        const ended = new Promise<void>((resolve) => this.once('disconnect', () => resolve()));
        s.disconnect('server shutting down');
        await ended;
      }
      this.#poller.remove(this.#listenFd);
      this.#poller.close();
      try {
        fs.closeSync(this.#listenFd);
      } catch {
        // already closed
      }
      try {
        fs.unlinkSync(this.socketPath);
      } catch {
        // removed by someone else
      }
    })();
    return this.#closing;
  }
}

/** One connected front-end: reads and frames messages, runs them in order, sends replies. */
class Session {
  readonly fd: number;
  readonly backend: VhostUserBackend;
  readonly #poller: Poller;
  readonly #log: (line: string) => void;
  readonly #onEnd: () => void;
  readonly #decoder = new MessageDecoder();
  readonly #queue: VhostUserMessage[] = [];
  readonly #buf = Buffer.alloc(RECV_CHUNK);
  #running: Promise<void> | undefined;
  #ended = false;
  /** Reply bytes the socket has not taken yet, oldest first (written when it becomes writable). */
  readonly #unsent: Buffer[] = [];
  #unsentBytes = 0;
  /** Reading stopped because the backlog is full (the socket is not armed). */
  #paused = false;
  #resumeScheduled = false;

  constructor(fd: number, backend: VhostUserBackend, poller: Poller, log: (line: string) => void, onEnd: () => void) {
    this.fd = fd;
    this.backend = backend;
    this.#poller = poller;
    this.#log = log;
    this.#onEnd = onEnd;
  }

  /** Messages received and not yet handled (at most about MAX_QUEUED_MESSAGES). */
  get backlog(): number {
    return this.#queue.length;
  }

  /** The poller reported the socket: write what is waiting, then read what arrived. */
  ready(): void {
    if (this.#ended) return;
    if (!this.#flushReplies()) return;
    this.readable();
  }

  /**
   * The socket is readable: read until EAGAIN (or until the backlog is full: then stay paused,
   * un-armed, until #run has handled half of it), queue complete messages, re-arm.
   */
  readable(): void {
    if (this.#ended) return;
    this.#paused = false;
    for (;;) {
      if (this.#queue.length >= MAX_QUEUED_MESSAGES) {
        this.#paused = true;
        break;
      }
      let r;
      try {
        r = receiveWithFds(this.fd, this.#buf);
      } catch (e) {
        this.disconnect(`receive failed: ${e instanceof Error ? e.message : String(e)}`);
        return;
      }
      if (r === undefined) break;
      if (r.bytes === 0) {
        for (const fd of r.fds) closeQuietly(fd);
        const pending = this.#decoder.pendingBytes;
        this.disconnect(pending > 0 ? `front-end disconnected in the middle of a message (${pending} bytes of it received)` : undefined);
        return;
      }
      try {
        this.#queue.push(...this.#decoder.push(this.#buf.subarray(0, r.bytes), r.fds));
      } catch (e) {
        this.disconnect(e instanceof Error ? e.message : String(e));
        return;
      }
    }
    if (!this.#arm()) return;
    if (this.#running === undefined) {
      this.#running = this.#run().finally(() => {
        this.#running = undefined;
      });
    }
  }

  async #run(): Promise<void> {
    {
      while (!this.#ended && this.#queue.length > 0) {
        const m = this.#queue.shift() as VhostUserMessage;
        if (this.#paused && this.#queue.length <= MAX_QUEUED_MESSAGES / 2) this.#resumeSoon();
        const { reply, close } = await this.backend.handle(m);
        if (this.#ended) break;
        if (reply && !this.#reply(reply, m.request)) break;
        if (close) {
          this.disconnect(`closing the connection: ${requestName(m.request)} needs a reply vblk cannot give`);
          break;
        }
      }
    }
  }

  /**
   * Resumes reading in a later turn of the event loop, never from inside #run: handled messages
   * resolve as microtasks, so resuming there would let a front-end that keeps its socket full be
   * served in one unbroken run and nothing else (signals, timers, the device) would get a turn.
   */
  #resumeSoon(): void {
    if (this.#resumeScheduled) return;
    this.#resumeScheduled = true;
    setImmediate(() => {
      this.#resumeScheduled = false;
      this.readable();
    });
  }

  /**
   * Sends `reply`, or queues what the socket does not take now (it goes out when the socket is
   * writable). False when the session ended: the send failed, or the peer has left more than
   * MAX_UNREAD_REPLY_BYTES unread.
   */
  #reply(reply: Uint8Array, request: number): boolean {
    if (this.#unsent.length === 0) {
      let sent: number;
      try {
        sent = sendWithFds(this.fd, reply);
      } catch (e) {
        this.disconnect(`cannot reply to ${requestName(request)}: ${e instanceof Error ? e.message : String(e)}`);
        return false;
      }
      if (sent === reply.length) return true;
      reply = reply.subarray(sent);
    }
    this.#unsent.push(Buffer.from(reply));
    this.#unsentBytes += reply.length;
    if (this.#unsentBytes > MAX_UNREAD_REPLY_BYTES) {
      this.disconnect(`the front-end does not read its replies (${this.#unsentBytes} bytes unread, the limit is ${MAX_UNREAD_REPLY_BYTES}): disconnecting it`);
      return false;
    }
    if (this.#unsent.length === 1) return this.#arm(); // the first queued bytes: watch for writability
    return true;
  }

  /** Writes queued replies until the socket is full or they are gone; false when the session ended. */
  #flushReplies(): boolean {
    while (this.#unsent.length > 0) {
      const head = this.#unsent[0] as Buffer;
      let sent: number;
      try {
        sent = sendWithFds(this.fd, head);
      } catch (e) {
        this.disconnect(`cannot send queued replies: ${e instanceof Error ? e.message : String(e)}`);
        return false;
      }
      this.#unsentBytes -= sent;
      if (sent < head.length) {
        this.#unsent[0] = head.subarray(sent);
        break;
      }
      this.#unsent.shift();
    }
    return true;
  }

  /**
   * Asks the poller for the next report on the socket: readable unless reading is paused for a
   * full backlog, writable while replies wait. False when the session ended.
   */
  #arm(): boolean {
    const readable = !this.#paused;
    const writable = this.#unsent.length > 0;
    if (!readable && !writable) return true; // resumed by #run once the backlog drains
    try {
      this.#poller.rearm(this.fd, TOKEN_CONN, { readable, writable });
    } catch (e) {
      this.disconnect(`cannot watch the socket: ${e instanceof Error ? e.message : String(e)}`);
      return false;
    }
    return true;
  }

  /** Ends the session once: stop reading, drop queued messages, close the socket, tear down. */
  disconnect(reason?: string): void {
    if (this.#ended) return;
    this.#ended = true;
    if (reason !== undefined) this.#log(`vhost-user: ${reason}`);
    for (const m of this.#queue.splice(0)) for (const fd of m.fds) closeQuietly(fd);
    for (const fd of this.#decoder.takeFds()) closeQuietly(fd);
    this.#unsent.length = 0;
    this.#unsentBytes = 0;
    try {
      this.#poller.remove(this.fd);
    } catch {
      // the poller is already gone
    }
    closeQuietly(this.fd);
    // Let a message being handled finish (it may be waiting for in-flight requests) first.
    void (this.#running ?? Promise.resolve()).then(() => this.#onEnd());
  }
}

