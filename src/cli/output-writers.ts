/**
 * Output formats of `vblk convert`. Each is a factory for an `OutputWriter`; adding a format is one
 * line in `OUTPUT_FORMATS`. qcow2 output arrives with the read-write support (src/disk/qcow/create.ts):
 * its factory creates the image and writes through the qcow2 read-write ops table.
 */
import { NodeImageFile } from '../disk/file';
import type { ImageFormat } from '../disk/types';

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

/** Output formats `convert -O` knows; a missing entry gets a clear "not supported yet" error. */
export const OUTPUT_FORMATS: Partial<Record<ImageFormat, OutputFactory>> = {
  raw: createRawOutput,
  // qcow2: createQcow2Output (from src/disk/qcow/create.ts, with the read-write support)
};
