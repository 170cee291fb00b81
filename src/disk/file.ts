import * as fs from 'node:fs';
import { DiskError } from '../errors';

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
}

function ioError(op: string, path: string, err: unknown): DiskError {
  const e = err as NodeJS.ErrnoException;
  return new DiskError('E_DISK_IO', `Cannot ${op} ${path}: ${e.code ?? ''} ${e.message ?? String(err)}`.replace(/\s+/g, ' '), { errno: e.code }, { cause: err });
}

/**
 * An ImageFile over a plain file descriptor, using the callback fs API (measurably cheaper per
 * call than FileHandle promises on the 4 KiB hot path).
 */
export class NodeImageFile implements ImageFile {
  readonly path: string;
  readonly writable: boolean;
  readonly fd: number;
  #closed = false;

  private constructor(path: string, fd: number, writable: boolean) {
    this.path = path;
    this.fd = fd;
    this.writable = writable;
  }

  /** Opens an existing file; `create` makes a new one (failing if it exists, unless `truncate`). */
  static async open(path: string, opts: { writable: boolean; create?: boolean; truncate?: boolean }): Promise<NodeImageFile> {
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
    return new NodeImageFile(path, fd, opts.writable || opts.create === true);
  }

  read(buf: Uint8Array, position: number): Promise<number> {
    return new Promise((resolve, reject) => {
      const loop = (done: number): void => {
        fs.read(this.fd, buf, done, buf.length - done, position + done, (err, n) => {
          if (err) return reject(ioError('read', this.path, err));
          if (n === 0 || done + n === buf.length) return resolve(done + n);
          loop(done + n);
        });
      };
      if (buf.length === 0) resolve(0);
      else loop(0);
    });
  }

  write(buf: Uint8Array, position: number): Promise<void> {
    if (!this.writable) return Promise.reject(new DiskError('E_DISK_READONLY', `Cannot write ${this.path}: opened read-only`));
    return new Promise((resolve, reject) => {
      const loop = (done: number): void => {
        fs.write(this.fd, buf, done, buf.length - done, position + done, (err, n) => {
          if (err) return reject(ioError('write', this.path, err));
          if (done + n >= buf.length) return resolve();
          loop(done + n);
        });
      };
      if (buf.length === 0) resolve();
      else loop(0);
    });
  }

  sync(): Promise<void> {
    if (!this.writable) return Promise.resolve();
    return new Promise((resolve, reject) => fs.fdatasync(this.fd, (err) => (err ? reject(ioError('sync', this.path, err)) : resolve())));
  }

  size(): Promise<number> {
    return new Promise((resolve, reject) => fs.fstat(this.fd, (err, st) => (err ? reject(ioError('stat', this.path, err)) : resolve(st.size))));
  }

  truncate(length: number): Promise<void> {
    return new Promise((resolve, reject) => fs.ftruncate(this.fd, length, (err) => (err ? reject(ioError('truncate', this.path, err)) : resolve())));
  }

  close(): Promise<void> {
    if (this.#closed) return Promise.resolve();
    this.#closed = true;
    return new Promise((resolve, reject) => fs.close(this.fd, (err) => (err ? reject(ioError('close', this.path, err)) : resolve())));
  }
}
