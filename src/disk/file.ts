import * as fs from 'node:fs';
import { DiskError } from '../errors';
import { SyncFirstPolicy } from './sync-first';
import { seekDataOrHole } from '../native/libc';

/**
 * The host file under a disk image. Every format reads and writes through this interface, so a
 * test can put a fault-injecting or crash-simulating layer underneath (see `FaultyFile`).
 *
 * Obligations:
 * - `read` fills as much of `buf` as the file has and resolves to the count (short at EOF only).
 * - `write` writes all of `buf` or rejects.
 * - `sync` makes every write that resolved before it was called durable (fdatasync).
 * - None of them keeps a reference to `buf` after settling.
 */
export interface ImageFile {
  readonly path: string;
  readonly writable: boolean;
  read(buf: Uint8Array, position: number): Promise<number>;
  write(buf: Uint8Array, position: number): Promise<void>;
  sync(): Promise<void>;
  size(): Promise<number>;
  truncate(length: number): Promise<void>;
  close(): Promise<void>;
  /**
   * Whether the file holds data or a hole at `offset`, and for how many bytes (at most `length`;
   * past EOF counts as a hole). Optional, synchronous; undefined when the file cannot say (no
   * SEEK_DATA here, the native library missing). `map` uses it to report holes as qemu-img does.
   */
  extent?(offset: number, length: number): FileExtent | undefined;
  /** Bytes the file occupies on disk (st_blocks x 512). Optional. */
  allocatedBytes?(): Promise<number>;
}

/** A run of a host file that is all data or all hole. */
export interface FileExtent {
  readonly data: boolean;
  readonly length: number;
}

/** SEEK_DATA works in this process (false once a call failed: no native library, old kernel). */
let seekWorks = true;

/** `ImageFile.extent` over a file descriptor, with lseek SEEK_DATA / SEEK_HOLE. */
function fdExtent(fd: number, offset: number, length: number): FileExtent | undefined {
  if (!seekWorks || length <= 0) return undefined;
  try {
    const data = seekDataOrHole(fd, offset, 'data');
    if (data === undefined) return { data: false, length }; // no data at or after offset
    if (data > offset) return { data: false, length: Math.min(length, data - offset) };
    const hole = seekDataOrHole(fd, offset, 'hole') ?? offset + length;
    return { data: true, length: Math.max(1, Math.min(length, hole - offset)) };
  } catch {
    seekWorks = false; // this is extra information: without it every byte counts as data
    return undefined;
  }
}

/** `e` as an Error (what a promise rejects with); anything else is wrapped. */
function asError(e: unknown): Error {
  return e instanceof Error ? e : new Error(String(e));
}

function ioError(op: string, path: string, err: unknown): DiskError {
  const e = err as NodeJS.ErrnoException;
  return new DiskError('E_DISK_IO', `Cannot ${op} ${path}: ${e.code ?? ''} ${e.message ?? String(err)}`.replace(/\s+/g, ' '), { errno: e.code }, { cause: err });
}

export interface NodeImageFileOptions {
  readonly writable: boolean;
  /** Create the file (failing if it exists, unless `truncate`). */
  readonly create?: boolean;
  readonly truncate?: boolean;
  /**
   * Do an idle file's reads and writes synchronously when that is cheap (see sync-first.ts).
   * Default: on, unless the environment sets VBLK_IO=pool (every request through the pool).
   */
  readonly syncFirst?: boolean;
}

/**
 * An ImageFile over a plain file descriptor, using the callback fs API (measurably cheaper per
 * call than FileHandle promises on the 4 KiB hot path).
 */
export class NodeImageFile implements ImageFile {
  readonly path: string;
  readonly writable: boolean;
  readonly fd: number;
  /** Set when close() begins: new operations are refused from then on. */
  #closing: Promise<void> | undefined;
  /** Reads and writes in libuv's thread pool, not yet completed (the sync-first policy's input). */
  #inPool = 0;
  /**
   * Every operation on the descriptor that is still in the thread pool (reads, writes, syncs,
   * stats, truncates). close() waits for this to reach zero before it closes the descriptor:
   * closing earlier would let a queued pread/pwrite run on a number the kernel may already have
   * given to another file.
   */
  #pending = 0;
  #drained: (() => void) | undefined;
  readonly #syncFirst: SyncFirstPolicy | null;

  private constructor(path: string, fd: number, writable: boolean, syncFirst: boolean) {
    this.path = path;
    this.fd = fd;
    this.writable = writable;
    this.#syncFirst = syncFirst ? new SyncFirstPolicy() : null;
  }

  /** Opens an existing file; `create` makes a new one (failing if it exists, unless `truncate`). */
  static async open(path: string, opts: NodeImageFileOptions): Promise<NodeImageFile> {
    let flags = opts.writable ? 'r+' : 'r';
    if (opts.create) flags = opts.truncate ? 'w+' : 'wx+';
    const fd = await new Promise<number>((resolve, reject) => {
      fs.open(path, flags, 0o644, (err, fd) => (err ? reject(ioError('open', path, err)) : resolve(fd)));
    });
    // open(2) accepts a directory read-only; refuse it here rather than at the first read.
    const isDir = await new Promise<boolean>((resolve) => fs.fstat(fd, (err, st) => resolve(!err && st.isDirectory())));
    if (isDir) {
      await new Promise<void>((resolve) => fs.close(fd, () => resolve()));
      throw new DiskError('E_DISK_IO', `Cannot open ${path}: it is a directory`);
    }
    const syncFirst = opts.syncFirst ?? process.env['VBLK_IO'] !== 'pool';
    return new NodeImageFile(path, fd, opts.writable || opts.create === true, syncFirst);
  }

  read(buf: Uint8Array, position: number): Promise<number> {
    const refused = this.#refuseIfClosing('read');
    if (refused) return refused;
    if (buf.length === 0) return Promise.resolve(0);
    let done: number;
    try {
      done = this.#syncAttempt(false, buf, position);
    } catch (e) {
      return Promise.reject(asError(e));
    }
    if (done === buf.length || done === 0) return Promise.resolve(done); // whole, or at EOF
    if (done < 0) done = 0; // not tried
    this.#inPool++;
    return this.#inThreadPool<number>((resolve, reject) => {
      const loop = (got: number): void => {
        fs.read(this.fd, buf, got, buf.length - got, position + got, (err, n) => {
          if (err) {
            this.#inPool--;
            reject(ioError('read', this.path, err));
          } else if (n === 0 || got + n === buf.length) {
            this.#inPool--;
            resolve(got + n);
          } else {
            loop(got + n);
          }
        });
      };
      loop(done);
    });
  }

  write(buf: Uint8Array, position: number): Promise<void> {
    const refused = this.#refuseIfClosing('write');
    if (refused) return refused;
    if (!this.writable) return Promise.reject(new DiskError('E_DISK_READONLY', `Cannot write ${this.path}: opened read-only`));
    if (buf.length === 0) return Promise.resolve();
    let done: number;
    try {
      done = this.#syncAttempt(true, buf, position);
    } catch (e) {
      return Promise.reject(asError(e));
    }
    if (done >= buf.length) return Promise.resolve();
    if (done < 0) done = 0; // not tried
    this.#inPool++;
    return this.#inThreadPool<void>((resolve, reject) => {
      const loop = (got: number): void => {
        fs.write(this.fd, buf, got, buf.length - got, position + got, (err, n) => {
          if (err) {
            this.#inPool--;
            reject(ioError('write', this.path, err));
          } else if (got + n >= buf.length) {
            this.#inPool--;
            resolve();
          } else {
            loop(got + n);
          }
        });
      };
      loop(done);
    });
  }

  /** A rejected promise (E_DISK_CLOSED) once close() has begun, else undefined. */
  #refuseIfClosing(op: string): Promise<never> | undefined {
    if (this.#closing === undefined) return undefined;
    return Promise.reject(new DiskError('E_DISK_CLOSED', `Cannot ${op} ${this.path}: the file is closed`));
  }

  /** Runs a thread-pool operation counted in `#pending`, so that close() can wait for it. */
  #inThreadPool<T>(start: (resolve: (v: T) => void, reject: (e: Error) => void) => void): Promise<T> {
    this.#pending++;
    const settled = (): void => {
      if (--this.#pending === 0) this.#drained?.();
    };
    return new Promise<T>((resolve, reject) => {
      const fail = (e: Error): void => {
        settled();
        reject(e);
      };
      try {
        start((v) => {
          settled();
          resolve(v);
        }, fail);
      } catch (e) {
        // fs throws synchronously on arguments it refuses (a position past 2^53): nothing was
        // queued, so this operation is over.
        fail(asError(e));
      }
    });
  }

  /**
   * The synchronous attempt of sync-first I/O: the bytes moved (possibly short), or -1 when the
   * policy said no. Throws a DiskError when the call fails.
   */
  #syncAttempt(write: boolean, buf: Uint8Array, position: number): number {
    const policy = this.#syncFirst;
    if (policy === null || !policy.shouldTry(buf.length, this.#inPool)) return -1;
    const t0 = process.hrtime.bigint();
    try {
      return write ? fs.writeSync(this.fd, buf, 0, buf.length, position) : fs.readSync(this.fd, buf, 0, buf.length, position);
    } catch (err) {
      throw ioError(write ? 'write' : 'read', this.path, err);
    } finally {
      policy.record(Number(process.hrtime.bigint() - t0));
    }
  }

  /** Synchronous-first statistics (null when the file always uses the pool). */
  get syncFirst(): SyncFirstPolicy | null {
    return this.#syncFirst;
  }

  sync(): Promise<void> {
    const refused = this.#refuseIfClosing('sync');
    if (refused) return refused;
    if (!this.writable) return Promise.resolve();
    return this.#inThreadPool<void>((resolve, reject) => fs.fdatasync(this.fd, (err) => (err ? reject(ioError('sync', this.path, err)) : resolve())));
  }

  extent(offset: number, length: number): FileExtent | undefined {
    if (this.#closing !== undefined) throw new DiskError('E_DISK_CLOSED', `Cannot map ${this.path}: the file is closed`);
    return fdExtent(this.fd, offset, length);
  }

  allocatedBytes(): Promise<number> {
    return this.#refuseIfClosing('stat') ?? this.#inThreadPool<number>((resolve, reject) => fs.fstat(this.fd, (err, st) => (err ? reject(ioError('stat', this.path, err)) : resolve(st.blocks * 512))));
  }

  size(): Promise<number> {
    return this.#refuseIfClosing('stat') ?? this.#inThreadPool<number>((resolve, reject) => fs.fstat(this.fd, (err, st) => (err ? reject(ioError('stat', this.path, err)) : resolve(st.size))));
  }

  truncate(length: number): Promise<void> {
    return this.#refuseIfClosing('truncate') ?? this.#inThreadPool<void>((resolve, reject) => fs.ftruncate(this.fd, length, (err) => (err ? reject(ioError('truncate', this.path, err)) : resolve())));
  }

  /**
   * Waits for every operation still in the thread pool, then closes the descriptor. Operations
   * started after close() began are refused (E_DISK_CLOSED). Idempotent: every call gets the
   * same promise.
   */
  close(): Promise<void> {
    this.#closing ??= this.#drain().then(
      () => new Promise<void>((resolve, reject) => fs.close(this.fd, (err) => (err ? reject(ioError('close', this.path, err)) : resolve()))),
    );
    return this.#closing;
  }

  #drain(): Promise<void> {
    if (this.#pending === 0) return Promise.resolve();
    return new Promise<void>((resolve) => {
      this.#drained = resolve;
    });
  }
}
