/**
 * The bench framework: a suite measures vblk against a peer (qemu-img bench, qemu-storage-daemon,
 * ...) on the same images in the same run and returns rows; `main.ts` prints every row of every
 * suite as one side-by-side table with ratios. Adding a suite = one file + one line in `SUITES`.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';

/** One measured row: higher is better for both units. */
export interface BenchRow {
  readonly name: string;
  readonly unit: 'IOPS' | 'MiB/s';
  readonly peerName: string;
  readonly peer: number;
  readonly vblk: number;
  /** vblk/peer when the suite computes it otherwise than vblk / peer (a median of paired rounds). */
  readonly ratio?: number;
  readonly note?: string;
}

/** What a suite gets from main. */
export interface BenchContext {
  /** A fresh temp folder (removed after the run). */
  readonly dir: string;
  /** Progress message (shown on a TTY only). */
  progress(msg: string): void;
  /** Size in bytes of the test images (VBLK_BENCH_SIZE, default 1 GiB). */
  readonly imageSize: number;
  /** Multiplier for request counts (VBLK_BENCH_SCALE, default 1). */
  readonly scale: number;
}

export interface BenchSuite {
  readonly name: string;
  /** Why a suite cannot run here (missing tool...), or undefined. */
  unavailable?(): string | undefined;
  run(ctx: BenchContext): Promise<BenchRow[]>;
}

/** Runs a tool, throwing with its stderr on failure; returns stdout. */
export function tool(cmd: string, args: readonly string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 16 << 20 });
  if (r.error) throw r.error;
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status}): ${r.stderr.trim()}`);
  return r.stdout;
}

/** True when `cmd --version` runs. */
export function hasTool(cmd: string): boolean {
  const r = spawnSync(cmd, ['--version'], { stdio: 'ignore' });
  return r.status === 0;
}

/** Parses "Run completed in X seconds." (qemu-img bench and vblk bench). */
export function runSeconds(out: string): number {
  const m = /Run completed in ([\d.]+) seconds\./.exec(out);
  if (!m) throw new Error(`no "Run completed" line in: ${out}`);
  return Number(m[1]);
}

/**
 * Writes a raw image of `mib` MiB filled with `byte`, written back (fdatasync) before it returns,
 * so that kernel writeback threads do not compete for the CPUs during the measurements.
 */
export function writeFilledRaw(file: string, mib: number, byte: number): void {
  const fd = fs.openSync(file, 'w');
  try {
    const chunk = Buffer.alloc(1 << 20, byte);
    for (let i = 0; i < mib; i++) fs.writeSync(fd, chunk, 0, chunk.length, i * (1 << 20));
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Reads the whole file so that the next measurement starts from a warm page cache. This
 * machine's page cache does not hold on to files: a 256 MiB file read once was 14 % evicted 20 s
 * later with nothing else running.
 */
export function warmPageCache(file: string): void {
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(1 << 20);
    for (let pos = 0; ; ) {
      const n = fs.readSync(fd, buf, 0, buf.length, pos);
      if (n <= 0) break;
      pos += n;
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** Formats a value for the table ("38.2k", "912"). */
export function fmtValue(v: number): string {
  if (v >= 10000) return `${(v / 1000).toFixed(1)}k`;
  if (v >= 100) return v.toFixed(0);
  return v.toFixed(1);
}

/** The side-by-side table. */
export function formatTable(rows: readonly BenchRow[]): string {
  const head = ['benchmark', 'unit', 'peer', 'peer value', 'vblk', 'vblk/peer'];
  const body = rows.map((r) => [r.name, r.unit, r.peerName, fmtValue(r.peer), fmtValue(r.vblk), `${(r.ratio ?? r.vblk / r.peer).toFixed(2)}x${r.note ? `  (${r.note})` : ''}`]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => (b[i] ?? '').length)));
  const line = (cells: readonly string[]): string => cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i] ?? 0))).join('  ');
  return [line(head), line(widths.map((w) => '-'.repeat(w))), ...body.map(line)].join('\n') + '\n';
}
