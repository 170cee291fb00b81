/**
 * `openDiskImage()`: the probe chain and backing-file opening.
 *
 * Probe order (kvmtool's disk_image__open, made strict): a file that starts with the QFI magic is
 * qcow version 1 (version field 1) or qcow2 (2 or 3); the QFI magic with any other version is an
 * error, never raw. Anything else is raw. `format` forces a format; forcing qcow/qcow2 on a file
 * without the matching magic and version is an error.
 *
 * Backing files: names are resolved against the overlay's folder (QEMU's path_combine), the
 * backing-format header extension is honoured (else the backing file is probed), the chain depth
 * is capped and loops are detected by file identity (device and inode, so symlinks and hard links
 * count as the same file). Backing files are always opened read-only.
 */
import * as fs from 'node:fs';
import { DiskError } from '../errors';
import type { DiskImage } from './disk-image';
import { NodeImageFile, type ImageFile } from './file';
import type { ImageFormat, OpenOptions } from './types';
import { QCOW_MAGIC } from './qcow/header';
import { openRaw } from './raw';
import { openQcow2, combinePath } from './qcow/qcow2';
import { openQcow1 } from './qcow/qcow1';
import { openQcow2ReadWrite } from './qcow/qcow2-rw';
import { openQcow1ReadWrite } from './qcow/qcow1-rw';

/** Longest backing chain accepted (the image itself is depth 0). */
export const MAX_BACKING_DEPTH = 64;

/** `openDiskImage` options: the public ones plus tuning knobs. */
export interface OpenDiskOptions extends OpenOptions {
  /** Bytes of L2 tables each qcow/qcow2 layer may cache (default 32 MiB). */
  readonly l2CacheBytes?: number;
  /** Maximum backing chain depth (default 64). */
  readonly maxBackingDepth?: number;
  /**
   * Do not open backing files (for `vblk info`, like qemu-img's BDRV_O_NO_BACKING). Unallocated
   * clusters then read as zeroes, so use this only to inspect headers.
   */
  readonly noBacking?: boolean;
}

/** What a format opener gets. */
export interface OpenerContext {
  readonly path: string;
  readonly readonly: boolean;
  readonly l2CacheBytes: number | undefined;
  /** Opens a backing file named in this image's header. */
  readonly openBacking: (name: string, format: ImageFormat | undefined) => Promise<DiskImage | undefined>;
}

/** Opens one format over an open file; must close `file` if it fails. */
export type FormatOpener = (file: ImageFile, ctx: OpenerContext) => Promise<DiskImage>;

/**
 * The format table. A format without `readWrite` can only be opened read-only. The qcow2
 * read-write table (src/disk/qcow/qcow2-rw.ts) plugs in here with one line.
 */
export const FORMATS: Record<ImageFormat, { readonly readOnly: FormatOpener; readonly readWrite?: FormatOpener }> = {
  raw: {
    readOnly: (file, ctx) => openRaw(file, { path: ctx.path, readonly: true }),
    readWrite: (file, ctx) => openRaw(file, { path: ctx.path, readonly: false }),
  },
  qcow: {
    readOnly: (file, ctx) => openQcow1(file, qcowOpts(ctx)),
    readWrite: (file, ctx) => openQcow1ReadWrite(file, qcowOpts(ctx)),
  },
  qcow2: {
    readOnly: (file, ctx) => openQcow2(file, qcowOpts(ctx)),
    readWrite: (file, ctx) => openQcow2ReadWrite(file, qcowOpts(ctx)),
  },
};

function qcowOpts(ctx: OpenerContext): { path: string; openBacking: OpenerContext['openBacking']; l2CacheBytes?: number } {
  return ctx.l2CacheBytes === undefined ? { path: ctx.path, openBacking: ctx.openBacking } : { path: ctx.path, openBacking: ctx.openBacking, l2CacheBytes: ctx.l2CacheBytes };
}

/** The magic/version facts of a file's first 8 bytes. */
export async function probeFormat(file: ImageFile): Promise<{ format: ImageFormat; magic: boolean; version: number }> {
  const b = Buffer.alloc(8);
  const n = await file.read(b, 0);
  if (n < 8 || b.readUInt32BE(0) !== QCOW_MAGIC) return { format: 'raw', magic: false, version: 0 };
  const version = b.readUInt32BE(4);
  if (version === 1) return { format: 'qcow', magic: true, version };
  if (version === 2 || version === 3) return { format: 'qcow2', magic: true, version };
  throw new DiskError('E_QCOW_UNSUPPORTED', `Cannot open ${file.path}: it has the qcow magic but version ${version}, which is neither qcow (1) nor qcow2 (2, 3)`, { version });
}

interface ChainState {
  readonly depth: number;
  /** Identities (device:inode) of the images above this one (for loop detection). */
  readonly seen: readonly string[];
  /** Names as given, for the loop message. */
  readonly names: readonly string[];
  readonly opts: OpenDiskOptions;
}

/** Identity of a file for loop detection: device and inode (catches symlinks and hard links). */
async function fileIdentity(path: string): Promise<string> {
  const st = await fs.promises.stat(path);
  return `${st.dev}:${st.ino}`;
}

async function openLayer(path: string, format: ImageFormat | undefined, readonly: boolean, chain: ChainState): Promise<DiskImage> {
  const maxDepth = chain.opts.maxBackingDepth ?? MAX_BACKING_DEPTH;
  if (chain.depth > maxDepth) {
    throw new DiskError('E_BACKING', `Cannot open ${chain.names[0] ?? path}: the backing chain is deeper than ${maxDepth} images`, { depth: chain.depth });
  }
  let identity: string;
  try {
    identity = await fileIdentity(path);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code ?? 'error';
    if (chain.depth === 0) throw new DiskError('E_DISK_IO', `Cannot open ${path}: ${code === 'ENOENT' ? 'no such file' : code}`, { errno: code }, { cause: e });
    throw new DiskError('E_BACKING', `Cannot open backing file ${path} of ${chain.names[chain.names.length - 1] ?? '?'}: ${code === 'ENOENT' ? 'no such file' : code}`, { errno: code }, { cause: e });
  }
  const loopAt = chain.seen.indexOf(identity);
  if (loopAt >= 0) {
    throw new DiskError('E_BACKING', `Cannot open ${chain.names[0] ?? path}: backing chain loop: ${[...chain.names, path].join(' -> ')}`, { chain: [...chain.names, path] });
  }
  const file = await NodeImageFile.open(path, { writable: !readonly });
  let fmt: ImageFormat;
  try {
    const probed = await probeFormat(file);
    if (format === undefined || format === 'raw') fmt = format ?? probed.format;
    else if (probed.format !== format) {
      const what = probed.magic ? `a ${probed.format} image (version ${probed.version})` : 'not a qcow image (no QFI magic)';
      throw new DiskError('E_FORMAT_UNKNOWN', `Cannot open ${path} as ${format}: it is ${what}`, { format, probed: probed.format });
    } else fmt = format;
  } catch (e) {
    await file.close().catch(() => undefined);
    throw e;
  }
  const entry = FORMATS[fmt];
  const opener = readonly ? entry.readOnly : entry.readWrite;
  if (!opener) {
    await file.close().catch(() => undefined);
    throw new DiskError('E_DISK_READONLY', `Cannot open ${path} read-write: writing ${fmt} images is not supported yet; open it read-only`, { format: fmt });
  }
  const next: ChainState = { depth: chain.depth + 1, seen: [...chain.seen, identity], names: [...chain.names, path], opts: chain.opts };
  return opener(file, {
    path,
    readonly,
    l2CacheBytes: chain.opts.l2CacheBytes,
    openBacking: (name, bfmt) => (chain.opts.noBacking ? Promise.resolve(undefined) : openLayer(combinePath(path, name), bfmt, true, next)),
  });
}

/**
 * Opens a disk image, probing its format unless `opts.format` forces one, and its backing chain.
 *
 * @example
 *   const disk = await openDiskImage('top.qcow2', { readonly: true });
 *   const buf = new Uint8Array(65536);
 *   await disk.readSector(0, buf);
 *   await disk.close();
 *
 * @throws DiskError E_DISK_IO (cannot open the file), E_FORMAT_UNKNOWN (forced format does not
 *   match), E_QCOW_UNSUPPORTED / E_QCOW_CORRUPT (header), E_BACKING (backing file missing, loop,
 *   chain too deep), E_DISK_READONLY (read-write open of a format without write support).
 */
export function openDiskImage(path: string, opts: OpenDiskOptions = {}): Promise<DiskImage> {
  return openLayer(path, opts.format, opts.readonly ?? false, { depth: 0, seen: [], names: [], opts });
}
