/**
 * `make bench`: every suite's rows in one side-by-side table (vblk vs its peer, measured in the
 * same run). Not a pass/fail test. Environment:
 *   VBLK_BENCH_SIZE   image size (default 1G; k/M/G suffixes)
 *   VBLK_BENCH_SCALE  multiplier for request counts (default 1)
 *   VBLK_BENCH_ONLY   comma-separated suite names to run
 * Progress goes to stderr when it is a TTY.
 */
import '../threadpool'; // first: sizes the libuv pool before any fs call
import * as os from 'node:os';

import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseSize } from '../cli/args';
import { formatTable, type BenchRow, type BenchSuite } from './suite';
import { readSuite } from './read';
import { deviceSuite } from './device-suite';
import { writeSuite } from './write';
import { guestSuite } from './guest';

/** Every suite, in table order. Add a suite with one line here. */
export const SUITES: BenchSuite[] = [
  readSuite,
  writeSuite,
  deviceSuite,
  guestSuite,
];

async function main(): Promise<number> {
  const only = process.env['VBLK_BENCH_ONLY']?.split(',').filter(Boolean);
  const imageSize = parseSize(process.env['VBLK_BENCH_SIZE'] ?? '1G', 'VBLK_BENCH_SIZE');
  const scale = Number(process.env['VBLK_BENCH_SCALE'] ?? '1');
  const tty = process.stderr.isTTY === true;
  const rows: BenchRow[] = [];
  const t0 = Date.now();
  for (const suite of SUITES) {
    if (only && !only.includes(suite.name)) continue;
    const why = suite.unavailable?.();
    if (why) {
      process.stdout.write(`suite ${suite.name}: skipped (${why})\n`);
      continue;
    }
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), `vblk-bench-${suite.name}-`));
    try {
      const progress = (msg: string): void => {
        if (tty) process.stderr.write(`\r\x1b[K[${suite.name} ${((Date.now() - t0) / 1000).toFixed(0)}s] ${msg}`);
      };
      rows.push(...(await suite.run({ dir, progress, imageSize, scale })));
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
      if (tty) process.stderr.write('\r\x1b[K');
    }
  }
  process.stdout.write(`vblk bench (${os.cpus().length} CPUs, node ${process.version}, images ${imageSize >> 20} MiB, page cache on both sides)\n\n`);
  process.stdout.write(formatTable(rows));
  process.stdout.write(`\ntotal ${((Date.now() - t0) / 1000).toFixed(0)} s\n`);
  return 0;
}

main().then(
  (c) => (process.exitCode = c),
  (e: unknown) => {
    process.stderr.write(`vblk bench: ${e instanceof Error ? e.message : String(e)}\n`);
    process.exitCode = 1;
  },
);
