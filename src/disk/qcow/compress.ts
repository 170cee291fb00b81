/**
 * Compressed clusters: raw deflate with a 4 KiB window, as QEMU's qcow2-threads.c
 * (`deflateInit2(..., -12, ...)` / `inflateInit2(-12)`) and block/qcow.c do. zstd
 * (compression_type = 1) needs a zstd decoder Node 20 does not have, so such images are refused
 * at open (see `assertCompressionSupported`).
 */
import * as zlib from 'node:zlib';
import { DiskError, hex } from '../../errors';
import { COMPRESSION_DEFLATE, COMPRESSION_ZSTD } from './header';

/** deflate window bits QEMU uses (a larger window makes QEMU fail "invalid distance too far back"). */
export const QCOW_DEFLATE_WINDOW_BITS = 12;

/** Refuses compression types vblk cannot decode, naming the feature. */
export function assertCompressionSupported(path: string, compressionType: number): void {
  if (compressionType === COMPRESSION_DEFLATE) return;
  const name = compressionType === COMPRESSION_ZSTD ? 'zstd compression (compression_type 1)' : `compression_type ${compressionType}`;
  throw new DiskError('E_QCOW_UNSUPPORTED', `Cannot open ${path}: unsupported qcow2 feature: ${name}; convert it with qemu-img convert -O qcow2 -o compression_type=zlib`, {
    feature: 'compression-type',
  });
}

/**
 * Inflates one compressed cluster. `data` may extend past the end of the stream (the last sector
 * can belong to the next cluster) and may stop early as long as a whole cluster comes out, as
 * QEMU accepts Z_BUF_ERROR with a full output buffer.
 *
 * @param where host offset of the compressed data, for the error message
 * @throws DiskError E_QCOW_CORRUPT when the data does not inflate to exactly one cluster
 */
export function inflateCluster(data: Uint8Array, clusterSize: number, where: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    zlib.inflateRaw(
      data,
      { windowBits: QCOW_DEFLATE_WINDOW_BITS, finishFlush: zlib.constants.Z_SYNC_FLUSH, maxOutputLength: clusterSize * 2 },
      (err, out) => {
        if (err) {
          reject(new DiskError('E_QCOW_CORRUPT', `Cannot read compressed cluster at ${hex(where)}: the data does not inflate (${err.message})`, { offset: where }));
        } else if (out.length < clusterSize) {
          reject(new DiskError('E_QCOW_CORRUPT', `Cannot read compressed cluster at ${hex(where)}: it inflates to ${out.length} bytes, not ${clusterSize}`, { offset: where }));
        } else {
          resolve(out.length === clusterSize ? out : out.subarray(0, clusterSize));
        }
      },
    );
  });
}

/** Deflates one cluster the way QEMU does (raw deflate, window bits 12), for the write path. */
export function deflateCluster(data: Uint8Array): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    zlib.deflateRaw(data, { windowBits: QCOW_DEFLATE_WINDOW_BITS, level: zlib.constants.Z_DEFAULT_COMPRESSION }, (err, out) => (err ? reject(err) : resolve(out)));
  });
}
