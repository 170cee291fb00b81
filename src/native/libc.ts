/**
 * Typed libc calls that Node's `fs` does not offer: ioctl, mmap/munmap, eventfd, plus open/close
 * of character devices such as /dev/kvm. Implemented through the shim (`native-bindings/
 * kvm_shim.c`), which returns -errno on failure; every failure becomes a `TransportError`
 * "Cannot <action>: ENAME" with `data.errno`.
 *
 * The API is deliberately small and stable (other modules — KVM, vhost-user — build on it).
 *
 * @example
 * const m = mmap({ length: 1 << 20 });           // anonymous, zero-filled, read-write
 * m.buffer.writeUInt32LE(0x74726976, 0);         // zero-copy view of the mapping
 * munmap(m);
 */
import { arg, callI64, callPointer, checkErrno, externalBuffer } from './library';

/** open(2) flags and mode bits used by vblk (x86-64 / generic Linux values). */
export const O_RDONLY = 0;
export const O_WRONLY = 1;
export const O_RDWR = 2;
export const O_NONBLOCK = 0o4000;
export const O_CLOEXEC = 0o2000000;

export const PROT_NONE = 0;
export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const PROT_EXEC = 4;

export const MAP_SHARED = 0x01;
export const MAP_PRIVATE = 0x02;
export const MAP_FIXED = 0x10;
export const MAP_ANONYMOUS = 0x20;
export const MAP_NORESERVE = 0x4000;

export const EFD_SEMAPHORE = 1;
export const EFD_NONBLOCK = 0o4000;

/** Opens `path` (O_CLOEXEC is always added). Resolves to the fd. */
export function open(path: string, flags: number, mode = 0): number {
  return checkErrno(callI64('vblk', 'vblk_open', [arg.string(path), arg.i32(flags), arg.i32(mode)]), `open ${path}`);
}

const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const ENXIO = 6;

/**
 * lseek(2) with SEEK_DATA (`'data'`) or SEEK_HOLE (`'hole'`): the offset of the first byte of
 * data, or of the first hole, at or after `offset`; undefined when there is no data there (ENXIO).
 * A file system without hole tracking reports the whole file as data.
 */
export function seekDataOrHole(fd: number, offset: number, what: 'data' | 'hole'): number | undefined {
  const r = callI64('vblk', 'vblk_lseek', [arg.i32(fd), arg.i64(offset), arg.i32(what === 'data' ? SEEK_DATA : SEEK_HOLE)]);
  if (r === BigInt(-ENXIO)) return undefined;
  return checkErrno(r, `lseek fd ${fd} to the next ${what} at ${offset}`);
}

/** close(2). */
export function close(fd: number): void {
  checkErrno(callI64('vblk', 'vblk_close', [arg.i32(fd)]), `close fd ${fd}`);
}

/**
 * ioctl(2) with an integer (or no) argument. Returns the non-negative result.
 * @param what names the request in error messages ("KVM_CREATE_VM").
 */
export function ioctl(fd: number, request: number, value: number | bigint = 0, what = `ioctl 0x${request.toString(16)}`): number {
  return checkErrno(callI64('vblk', 'vblk_ioctl', [arg.i32(fd), arg.i64(request), arg.i64(value)]), what, 'E_NATIVE');
}

/**
 * ioctl(2) whose argument points to `buf` (a struct in, out or both: the kernel reads and writes
 * the bytes in place). Returns the non-negative result.
 */
export function ioctlBuffer(fd: number, request: number, buf: Uint8Array, what = `ioctl 0x${request.toString(16)}`): number {
  return checkErrno(callI64('vblk', 'vblk_ioctl_buf', [arg.i32(fd), arg.i64(request), arg.buffer(buf)]), what, 'E_NATIVE');
}

/** A range of this process's address space mapped by `mmapRange` (or `mmap`). */
export interface MappedRange {
  /** Host virtual address of the first byte. */
  readonly address: bigint;
  readonly length: number;
}

/** A live memory mapping: its address and a zero-copy Buffer over it. */
export interface Mapping extends MappedRange {
  /** The mapped bytes (no copy: writes go straight to the mapping). Do not use after munmap. */
  readonly buffer: Buffer;
}

/** Options of `mmap`; without `fd` the mapping is anonymous and zero-filled. */
export interface MmapOptions {
  readonly length: number;
  /** PROT_* bits; default PROT_READ | PROT_WRITE. */
  readonly prot?: number;
  /** MAP_* bits; default MAP_SHARED for a file, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE otherwise. */
  readonly flags?: number;
  readonly fd?: number;
  /** File offset (page-aligned). */
  readonly offset?: number | bigint;
}

/**
 * mmap(2) without a Buffer over the result: for mappings larger than one Buffer may be (guest
 * RAM of several GiB); `bufferAt` makes views of parts of it.
 */
export function mmapRange(opts: MmapOptions): MappedRange {
  const { length } = opts;
  if (!Number.isSafeInteger(length) || length <= 0) throw new RangeError(`mmap length invalid: ${length}`);
  const anonymous = opts.fd === undefined;
  const prot = opts.prot ?? PROT_READ | PROT_WRITE;
  const flags = opts.flags ?? (anonymous ? MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE : MAP_SHARED);
  const r = callI64('vblk', 'vblk_mmap', [
    arg.i64(0),
    arg.i64(length),
    arg.i32(prot),
    arg.i32(flags),
    arg.i32(opts.fd ?? -1),
    arg.i64(opts.offset ?? 0),
  ]);
  const what = anonymous ? `map ${length} bytes of memory` : `mmap fd ${opts.fd ?? -1} (${length} bytes at offset ${opts.offset ?? 0})`;
  // Addresses are user-space (< 2^47) so negative always means -errno.
  if (r < 0n) checkErrno(r, what);
  return { address: r, length };
}

/**
 * A zero-copy Buffer over `length` bytes at host address `address`, which must stay mapped while
 * the Buffer is in use. `length` is at most buffer.constants.MAX_LENGTH.
 */
export function bufferAt(address: bigint, length: number): Buffer {
  if (address <= 0n) throw new RangeError(`buffer address invalid: ${address}`);
  const ptr = callPointer('vblk', 'vblk_ptr', [arg.i64(address)]);
  return externalBuffer(ptr, length);
}

/** mmap(2): maps memory and returns its address with a zero-copy Buffer. */
export function mmap(opts: MmapOptions): Mapping {
  const m = mmapRange(opts);
  try {
    return { ...m, buffer: bufferAt(m.address, m.length) };
  } catch (e) {
    munmap(m); // longer than a Buffer can be: nothing may stay mapped
    throw e;
  }
}

/** munmap(2). Buffers over the range must not be used afterwards. */
export function munmap(m: MappedRange): void {
  checkErrno(callI64('vblk', 'vblk_munmap', [arg.i64(m.address), arg.i64(m.length)]), `munmap ${m.length} bytes`);
}

/** eventfd(2) (EFD_CLOEXEC is always added). Read and write it with `fs` (8-byte LE counters). */
export function eventfd(initval = 0, flags = 0): number {
  return checkErrno(callI64('vblk', 'vblk_eventfd', [arg.i32(initval), arg.i32(flags)]), 'create an eventfd');
}

/** File seals (fcntl F_ADD_SEALS / F_GET_SEALS). */
export const F_SEAL_SEAL = 0x0001;
export const F_SEAL_SHRINK = 0x0002;
export const F_SEAL_GROW = 0x0004;
export const F_SEAL_WRITE = 0x0008;
/** memfd_create flags. */
export const MFD_ALLOW_SEALING = 0x0002;

/**
 * The seals of `fd` (F_GET_SEALS), or undefined when the file does not support sealing (EINVAL:
 * not a memfd or shmem file).
 */
export function getSeals(fd: number): number | undefined {
  const r = callI64('vblk', 'vblk_get_seals', [arg.i32(fd)]);
  if (r === -22n /* EINVAL */) return undefined;
  return checkErrno(r, `read the seals of fd ${fd}`);
}

/** memfd_create(2) (MFD_CLOEXEC is always added). */
export function memfdCreate(name: string, flags = 0): number {
  return checkErrno(callI64('vblk', 'vblk_memfd_create', [arg.string(name), arg.i32(flags)]), 'create a memfd');
}

/** fcntl(F_ADD_SEALS). */
export function addSeals(fd: number, seals: number): void {
  checkErrno(callI64('vblk', 'vblk_add_seals', [arg.i32(fd), arg.i32(seals)]), `seal fd ${fd}`);
}
