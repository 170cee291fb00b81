/**
 * Output formats of `vblk convert`. Each is a factory for an `OutputWriter`; adding a format is one
 * line in `OUTPUT_FORMATS`. raw writes a sparse file; qcow2 creates the image (src/disk/qcow/create.ts)
 * and writes through the qcow2 read-write ops table. (This module imports from commands/create.ts,
 * which imports nothing from here: no cycle.)
 */
import * as fs from 'node:fs';
import { NodeImageFile } from '../disk/file';
import { openDiskImage } from '../disk/open';
import { createImage } from '../disk/qcow/create';
import type { ImageFormat } from '../disk/types';
import { UsageError } from './command';
import { createOptionsFrom } from './commands/create';

/** Receives the converted contents. Offsets and lengths are multiples of 512 except at the end. */
export interface OutputWriter {
  /** Writes guest data at `offset`. Ranges never written read as zeroes. */
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Makes everything durable (unless `sync` is false: `-t unsafe`) and closes the output. */
  close(sync: boolean): Promise<void>;
  /** Removes what was written (after a failure); best effort. */
  abort(): Promise<void>;
}

/** Creates the output image `path` of `size` bytes (truncating an existing file). */
export type OutputFactory = (path: string, size: number, opts: { readonly options: ReadonlyMap<string, string> }) => Promise<OutputWriter>;

/** raw: a sparse file of the virtual size; only non-zero data is written. */
export const createRawOutput: OutputFactory = async (path, size) => {
  const file = await NodeImageFile.open(path, { writable: true, create: true, truncate: true });
  try {
    await file.truncate(size);
  } catch (e) {
    await file.close().catch(() => undefined);
    throw e;
  }
  return {
    write: (offset, data) => file.write(data, offset),
    async close(sync) {
      try {
        if (sync) await file.sync();
      } finally {
        await file.close();
      }
    },
    async abort() {
      await file.close().catch(() => undefined);
    },
  };
};

/**
 * qcow2 output: a new image (`-o` options as `vblk create`) written through the qcow2
 * read-write ops table; ranges never written stay unallocated (sparse).
 */
export const createQcow2Output: OutputFactory = async (path, size, { options }) => {
  const o = createOptionsFrom(options);
  if (o.backingFile !== undefined) throw new UsageError('convert -O qcow2 does not take a backing file');
  await createImage(path, { ...o, format: 'qcow2', size, overwrite: true });
  const disk = await openDiskImage(path, { format: 'qcow2' });
  return {
    async write(offset, data) {
      if (offset % 512 === 0 && data.length % 512 === 0) {
        await disk.writeSector(offset / 512, data);
        return;
      }
      // The tail of an image whose size is not a multiple of 512: pad the last sector.
      const end = Math.ceil((offset + data.length) / 512) * 512;
      const first = Math.floor(offset / 512) * 512;
      const b = new Uint8Array(end - first);
      b.set(data, offset - first);
      await disk.writeSector(first / 512, b);
    },
    async close() {
      await disk.close(); // the qcow2 close flushes (metadata ordering needs it, even with -t unsafe)
    },
    async abort() {
      await disk.close().catch(() => undefined);
      fs.rmSync(path, { force: true });
    },
  };
};

/** Output formats `convert -O` knows; a missing entry gets a clear "not supported yet" error. */
export const OUTPUT_FORMATS: Partial<Record<ImageFormat, OutputFactory>> = {
  raw: createRawOutput,
  qcow2: createQcow2Output,
};
