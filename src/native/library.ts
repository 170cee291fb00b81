/**
 * The one place that loads native libraries with ffi-rs: libc and vblk's own shim
 * (`build/native/libvblk.so`, compiled from `native-bindings/*.c` by `make native`).
 *
 * Everything above this module calls typed wrappers; ffi-rs's loosely typed `load` is confined
 * here and every value it returns is narrowed before it leaves. Shim functions follow one
 * convention: they return an `int64_t` that is the result, or `-errno` on failure, so errno never
 * has to cross the FFI boundary (see `checkErrno`).
 *
 * Cost: one call is 2.5–8 µs, so nothing here belongs on a per-request path. Guest memory is a
 * zero-copy Buffer (`externalBuffer`) and notifications are eventfds read and written with `fs`.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as util from 'node:util';
import type * as FfiRs from 'ffi-rs';
import { TransportError } from '../errors';

let ffiModule: typeof FfiRs | undefined;

/**
 * ffi-rs, loaded on first use: importing vblk (disk formats, the device) must work on hosts where
 * its native addon cannot load; only the KVM harness and vhost-user mmap need it.
 */
function ffiRs(): typeof FfiRs {
  if (ffiModule === undefined) {
    try {
      ffiModule = require('ffi-rs') as typeof FfiRs;
    } catch (e) {
      throw new TransportError('E_NATIVE', `Cannot load ffi-rs: ${e instanceof Error ? e.message.split('\n')[0] : String(e)}`, {}, { cause: e });
    }
  }
  return ffiModule;
}

/** The libraries vblk loads: the C library and vblk's shim. */
export type NativeLibrary = 'libc' | 'vblk';

/** An opaque native pointer, as ffi-rs represents it. */
export type NativePointer = FfiRs.JsExternal;

/** One typed argument of a native call. */
export type NativeArg =
  | { readonly kind: 'i32'; readonly value: number }
  | { readonly kind: 'i64'; readonly value: bigint }
  | { readonly kind: 'string'; readonly value: string }
  | { readonly kind: 'buffer'; readonly value: Uint8Array }
  | { readonly kind: 'pointer'; readonly value: NativePointer };

/** Constructors for `NativeArg`s, so call sites read `arg.i32(fd), arg.i64(addr)`. */
export const arg = {
  /** A C `int` / `int32_t` / `uint32_t` (passed as a 32-bit integer). */
  i32(value: number): NativeArg {
    if (!Number.isInteger(value) || value < -0x80000000 || value > 0xffffffff) {
      throw new RangeError(`native i32 argument out of range: ${value}`);
    }
    return { kind: 'i32', value: value > 0x7fffffff ? value - 0x100000000 : value };
  },
  /** A C `int64_t` / `uint64_t` / pointer-sized integer. */
  i64(value: bigint | number): NativeArg {
    const v = BigInt(value);
    if (v < -(1n << 63n) || v >= 1n << 64n) throw new RangeError(`native i64 argument out of range: ${v}`);
    return { kind: 'i64', value: BigInt.asIntN(64, v) };
  },
  /** A NUL-terminated C string (`const char *`), UTF-8. */
  string(value: string): NativeArg {
    return { kind: 'string', value };
  },
  /** A pointer to the bytes of `value` (the callee may read and write them in place). */
  buffer(value: Uint8Array): NativeArg {
    return { kind: 'buffer', value };
  },
  /** An opaque pointer previously returned by a native call. */
  pointer(value: NativePointer): NativeArg {
    return { kind: 'pointer', value };
  },
};

/** Where `make native` puts the shim, relative to the package root. */
export function nativeLibraryPath(): string {
  // This file compiles to build/src/native/library.js; the package root is three levels up.
  return path.resolve(__dirname, '..', '..', '..', 'build', 'native', 'libvblk.so');
}

const loaded = new Set<NativeLibrary>();

/**
 * Loads `lib` once (later calls are no-ops).
 * @throws TransportError E_NATIVE when the shim was not built or cannot be loaded.
 */
export function loadLibrary(lib: NativeLibrary): void {
  if (loaded.has(lib)) return;
  const ffi = ffiRs();
  const file = lib === 'libc' ? 'libc.so.6' : nativeLibraryPath();
  if (lib === 'vblk' && !fs.existsSync(file)) {
    throw new TransportError('E_NATIVE', `Cannot load native library: ${file} is missing (run \`make native\`)`, { file });
  }
  try {
    ffi.open({ library: lib, path: file });
  } catch (e) {
    throw new TransportError('E_NATIVE', `Cannot load native library ${file}: ${String(e)}`, { file }, { cause: e });
  }
  loaded.add(lib);
}

function toParams(args: readonly NativeArg[]): { types: FfiRs.DataType[]; values: unknown[] } {
  const ffi = ffiRs();
  const types: FfiRs.DataType[] = [];
  const values: unknown[] = [];
  for (const a of args) {
    switch (a.kind) {
      case 'i32':
        types.push(ffi.DataType.I32);
        values.push(a.value);
        break;
      case 'i64':
        types.push(ffi.DataType.BigInt);
        values.push(a.value);
        break;
      case 'string':
        types.push(ffi.DataType.String);
        values.push(a.value);
        break;
      case 'buffer':
        types.push(ffi.DataType.U8Array);
        values.push(Buffer.isBuffer(a.value) ? a.value : Buffer.from(a.value.buffer, a.value.byteOffset, a.value.byteLength));
        break;
      case 'pointer':
        types.push(ffi.DataType.External);
        values.push(a.value);
        break;
    }
  }
  return { types, values };
}

function asBigInt(v: unknown, fn: string): bigint {
  if (typeof v === 'bigint') return v;
  if (typeof v === 'number' && Number.isInteger(v)) return BigInt(v);
  throw new TransportError('E_NATIVE', `Cannot call ${fn}: it returned ${typeof v}, expected an integer`);
}

/**
 * Calls `fn` in `lib` with an `int64_t` result (shim convention: result or -errno).
 * @example callI64('vblk', 'vblk_close', [arg.i32(fd)])
 */
export function callI64(lib: NativeLibrary, fn: string, args: readonly NativeArg[]): bigint {
  const ffi = ffiRs();
  loadLibrary(lib);
  const { types, values } = toParams(args);
  const r: unknown = ffi.load({ library: lib, funcName: fn, retType: ffi.DataType.BigInt, paramsType: types, paramsValue: values });
  return asBigInt(r, fn);
}

/**
 * Like `callI64` but runs the call on a worker thread and resolves when it returns: for calls
 * that block (KVM_RUN, a blocking read). The arguments must stay alive until it settles.
 */
export async function callI64Blocking(lib: NativeLibrary, fn: string, args: readonly NativeArg[]): Promise<bigint> {
  const ffi = ffiRs();
  loadLibrary(lib);
  const { types, values } = toParams(args);
  const r: unknown = await ffi.load({
    library: lib,
    funcName: fn,
    retType: ffi.DataType.BigInt,
    paramsType: types,
    paramsValue: values,
    runInNewThread: true,
  });
  return asBigInt(r, fn);
}

/** Calls `fn` in `lib` with a pointer result (for `createExternalBuffer`). */
export function callPointer(lib: NativeLibrary, fn: string, args: readonly NativeArg[]): NativePointer {
  const ffi = ffiRs();
  loadLibrary(lib);
  const { types, values } = toParams(args);
  const r: unknown = ffi.load({ library: lib, funcName: fn, retType: ffi.DataType.External, paramsType: types, paramsValue: values });
  if (typeof r !== 'object' || r === null) {
    throw new TransportError('E_NATIVE', `Cannot call ${fn}: it returned ${typeof r}, expected a pointer`);
  }
  return r as NativePointer;
}

/**
 * Wraps `length` bytes at `ptr` as a Buffer without copying. The caller owns the memory: it must
 * stay mapped while the Buffer is in use (ffi-rs never frees it).
 */
export function externalBuffer(ptr: NativePointer, length: number): Buffer {
  if (!Number.isSafeInteger(length) || length < 0) throw new RangeError(`external buffer length invalid: ${length}`);
  return ffiRs().createExternalBuffer(ptr, length);
}

/** The symbolic name of a positive errno value ("ENOENT"), or "errno N". */
export function errnoName(errno: number): string {
  try {
    return util.getSystemErrorName(-errno);
  } catch {
    return `errno ${errno}`;
  }
}

/**
 * Applies the shim's "-errno" convention: returns `r` as a number when it is >= 0, otherwise
 * throws TransportError with the given code and "Cannot <action>: ENAME" (data.errno holds the
 * number, for callers that branch on it).
 */
export function checkErrno(r: bigint, action: string, code: 'E_NATIVE' | 'E_KVM' = 'E_NATIVE'): number {
  if (r >= 0n) {
    if (r > BigInt(Number.MAX_SAFE_INTEGER)) throw new TransportError(code, `Cannot ${action}: result ${r} is not a safe integer`);
    return Number(r);
  }
  const errno = Number(-r);
  throw new TransportError(code, `Cannot ${action}: ${errnoName(errno)}`, { errno, errnoName: errnoName(errno) });
}
