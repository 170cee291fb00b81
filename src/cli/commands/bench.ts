/**
 * `vblk bench [-f FMT] [-c N] [-d DEPTH] [-s SIZE] [-S STEP] [-o OFFSET] [-w [--pattern=N]]
 * [-t CACHE] [-n] [-i AIO] [-q] IMG`: the `qemu-img bench` workload through vblk's disk layer.
 * `count` requests of `size` bytes, `depth` in flight; request k is at offset + k*step, wrapping
 * modulo the image size (qemu-img 7.2). Prints the same two lines as qemu-img bench.
 *
 * `-t`, `-n` and `-i` are accepted for compatibility; vblk always goes through the page cache
 * (Node has no O_DIRECT-aligned buffers), which is the `-t writeback` case of qemu-img bench.
 */
import type { DiskImage } from '../../disk/disk-image';
import { openDiskImage } from '../../disk/open';
import { parseArgs, parseCount, parseFormat, parsePattern, parseSize } from '../args';
import { UsageError, type Command } from '../command';

/** A bench run's parameters (qemu-img bench defaults). */
export interface BenchParams {
  readonly count: number;
  readonly depth: number;
  readonly size: number;
  readonly step: number;
  readonly offset: number;
  readonly write: boolean;
  readonly pattern: number;
}

/** Largest total of request buffers (depth x size) a bench run may allocate: 1 GiB. */
export const MAX_BENCH_BUFFER_BYTES = 1 << 30;

export const BENCH_DEFAULTS: BenchParams = { count: 75000, depth: 64, size: 4096, step: 4096, offset: 0, write: false, pattern: 0 };

/**
 * Checks the parameters that do not depend on the image (before it is opened, so a bad option
 * never prints the "Sending ..." line or touches the file).
 *
 * @throws UsageError naming the option
 */
export function validateBenchParams(p: BenchParams): void {
  if (p.size === 0) throw new UsageError('invalid buffer size 0: it must be at least 512');
  for (const [name, v] of [['buffer size', p.size], ['step', p.step], ['offset', p.offset]] as const) {
    if (v % 512 !== 0) throw new UsageError(`invalid ${name} ${v}: it must be a multiple of 512`);
  }
  if (p.depth < 1) throw new UsageError('invalid queue depth 0: it must be at least 1');
  // One buffer per request in flight (as qemu-img bench): cap the total before allocating it.
  const buffers = Math.min(p.depth, p.count) * p.size;
  if (buffers > MAX_BENCH_BUFFER_BYTES) {
    throw new UsageError(`queue depth ${p.depth} x buffer size ${p.size} needs ${buffers} bytes of buffers, more than the ${MAX_BENCH_BUFFER_BYTES} allowed`);
  }
}

function assertRequestFits(disk: DiskImage, p: BenchParams): void {
  if (p.size > disk.size) throw new UsageError(`request size ${p.size} is larger than the image (${disk.size})`);
}

/** Runs the workload on an open disk; resolves to the elapsed seconds. */
export async function runBench(disk: DiskImage, p: BenchParams): Promise<number> {
  validateBenchParams(p);
  assertRequestFits(disk, p);
  let issued = 0;
  let offset = p.offset % disk.size;
  const worker = async (buf: Uint8Array): Promise<void> => {
    while (issued < p.count) {
      issued++;
      let off = offset;
      offset = (offset + p.step) % disk.size;
      if (off + p.size > disk.size) off = 0;
      if (p.write) await disk.writeSector(off / 512, buf);
      else await disk.readSector(off / 512, buf);
    }
  };
  const bufs = Array.from({ length: Math.min(p.depth, p.count) }, () => new Uint8Array(p.size).fill(p.pattern));
  const t0 = process.hrtime.bigint();
  await Promise.all(bufs.map((b) => worker(b)));
  // Stop the clock before the final flush, as qemu-img bench does (it flushes only at close).
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  if (p.write) await disk.flush();
  return secs;
}

export const benchCommand: Command = {
  name: 'bench',
  summary: 'run the qemu-img bench workload through vblk (prints "Run completed in X seconds.")',
  usage: 'bench [-f FMT] [-c COUNT] [-d DEPTH] [-s SIZE] [-S STEP] [-o OFFSET] [-w [--pattern=N]] [-t CACHE] [-n] [-i AIO] [-q] IMG',
  async run(argv, io) {
    const a = parseArgs(argv, { values: 'fcdsSoti', flags: 'wnqU', longValues: ['pattern', 'flush-interval'], longFlags: ['no-drain'] });
    const [path, extra] = a.positional;
    if (path === undefined || extra !== undefined) throw new UsageError('bench needs exactly one image');
    const get = (k: string): string | undefined => a.get(k);
    const size = get('s') !== undefined ? parseSize(get('s') ?? '', 'buffer size') : BENCH_DEFAULTS.size;
    const p: BenchParams = {
      count: get('c') !== undefined ? parseCount(get('c') ?? '', 'count') : BENCH_DEFAULTS.count,
      depth: get('d') !== undefined ? parseCount(get('d') ?? '', 'depth') : BENCH_DEFAULTS.depth,
      size,
      step: get('S') !== undefined ? parseSize(get('S') ?? '', 'step') : size,
      offset: get('o') !== undefined ? parseSize(get('o') ?? '', 'offset') : 0,
      write: a.has('w'),
      pattern: a.get('pattern') !== undefined ? parsePattern(a.get('pattern') ?? '') : 0,
    };
    validateBenchParams(p);
    const format = parseFormat(a.get('f'));
    const disk = await openDiskImage(path, { readonly: !p.write, ...(format ? { format } : {}) });
    try {
      assertRequestFits(disk, p);
      if (!a.has('q')) {
        io.stdout.write(`Sending ${p.count} ${p.write ? 'write' : 'read'} requests, ${p.size} bytes each, ${p.depth} in parallel (starting at offset ${p.offset}, step size ${p.step})\n`);
      }
      const secs = await runBench(disk, p);
      io.stdout.write(`Run completed in ${secs.toFixed(3)} seconds.\n`);
      return 0;
    } finally {
      await disk.close();
    }
  },
};
