/**
 * Test helpers around the real qemu tools (the oracle): run qemu-img / qemu-io, make throw-away
 * images in a temp folder, write byte patterns, and skip with a printed reason when the tools are
 * missing. Shared by the disk, cli and read-write tests; keep it general.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { skipBecause } from './skip';

let qemuChecked: boolean | undefined;

/** True when both qemu-img and qemu-io can be run. */
export function hasQemu(): boolean {
  if (qemuChecked === undefined) {
    const a = spawnSync('qemu-img', ['--version'], { stdio: 'ignore' });
    const b = spawnSync('qemu-io', ['--version'], { stdio: 'ignore' });
    qemuChecked = a.status === 0 && b.status === 0;
  }
  return qemuChecked;
}

/**
 * Call from a mocha `before`/`it` (with `function () {}`, not an arrow) to skip when qemu-img or
 * qemu-io is missing; prints the reason.
 */
export function requireQemu(ctx: Mocha.Context): void {
  if (!hasQemu()) {
    skipBecause(ctx, 'qemu-img/qemu-io not found; install Debian qemu-utils');
  }
}

/** Result of a tool run that may fail. */
export interface ToolResult {
  readonly status: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs a program and returns status/stdout/stderr without throwing. */
export function run(cmd: string, args: readonly string[], opts: { cwd?: string; input?: string } = {}): ToolResult {
  const r = spawnSync(cmd, args, { encoding: 'utf8', cwd: opts.cwd, input: opts.input, maxBuffer: 64 * 1024 * 1024 });
  if (r.error) throw r.error;
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** Runs qemu-img and returns stdout; throws with stderr on a non-zero exit. */
export function qemuImg(...args: string[]): string {
  try {
    return execFileSync('qemu-img', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 64 * 1024 * 1024 });
  } catch (e) {
    const err = e as { stderr?: string; status?: number };
    throw new Error(`qemu-img ${args.join(' ')} failed (${err.status}): ${err.stderr ?? ''}`);
  }
}

/** Runs qemu-io with one `-c` per command; throws when a command fails or prints an error. */
export function qemuIo(img: string, cmds: readonly string[], opts: { format?: string; readonly?: boolean } = {}): string {
  const args: string[] = [];
  if (opts.format) args.push('-f', opts.format);
  if (opts.readonly) args.push('-r');
  for (const c of cmds) args.push('-c', c);
  args.push(img);
  const r = run('qemu-io', args);
  // qemu-io exits 0 even when a command fails; errors go to stdout/stderr as text.
  const out = r.stdout + r.stderr;
  if (r.status !== 0 || /failed|error|Pattern verification failed/i.test(out)) {
    throw new Error(`qemu-io ${args.join(' ')} failed (${r.status}): ${out}`);
  }
  return r.stdout;
}

/** A temp folder under os.tmpdir(), removed by `cleanup()`. */
export interface TempDir {
  readonly dir: string;
  file(name: string): string;
  cleanup(): void;
}

export function makeTempDir(prefix = 'vblk-test-'): TempDir {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  return {
    dir,
    file: (name: string) => path.join(dir, name),
    cleanup: () => fs.rmSync(dir, { recursive: true, force: true }),
  };
}

/**
 * Registers mocha before/after hooks that create and remove a temp folder; the returned object's
 * `dir` is valid inside the tests of the enclosing `describe`.
 */
export function useTempDir(prefix = 'vblk-test-'): { readonly dir: string; file(name: string): string } {
  let t: TempDir | undefined;
  before(() => {
    t = makeTempDir(prefix);
  });
  after(() => t?.cleanup());
  return {
    get dir(): string {
      if (!t) throw new Error('temp dir used outside its describe');
      return t.dir;
    },
    file(name: string): string {
      if (!t) throw new Error('temp dir used outside its describe');
      return t.file(name);
    },
  };
}

/** One pattern write: `len` bytes of `byte` at `offset` (qemu-io `write -P`). */
export interface PatternWrite {
  readonly byte: number;
  readonly offset: number;
  readonly length: number;
}

/** The corpus pattern P from reference/qcow2.md section 2, scaled to a disk of `size` bytes. */
export function patternP(size: number): PatternWrite[] {
  const w: PatternWrite[] = [
    { byte: 0x11, offset: 0, length: 65536 },
    { byte: 0x22, offset: 1 << 20, length: 4096 },
    { byte: 0x33, offset: 0x300200, length: 0x600 },
    { byte: 0x44, offset: Math.floor(size / 2) - 4096, length: 8192 },
    { byte: 0x55, offset: size - 65536, length: 65536 },
  ];
  return w.filter((p) => p.offset >= 0 && p.offset + p.length <= size);
}

/** qemu-io commands for a list of pattern writes. */
export function writeCommands(writes: readonly PatternWrite[]): string[] {
  return writes.map((w) => `write -P 0x${w.byte.toString(16)} ${w.offset} ${w.length}`);
}

/** Writes patterns into an image through qemu-io. */
export function writePatterns(img: string, writes: readonly PatternWrite[], format?: string): void {
  if (writes.length > 0) qemuIo(img, writeCommands(writes), format ? { format } : {});
}

/** Options for `createImage`. */
export interface CreateOptions {
  readonly format?: 'raw' | 'qcow' | 'qcow2';
  /** `-o` options, e.g. { cluster_size: '4k', compat: '0.10' }. */
  readonly options?: Readonly<Record<string, string>>;
  readonly backing?: string;
  readonly backingFormat?: string;
}

/** `qemu-img create`; returns the path. */
export function createImage(file: string, size: string | number | undefined, opts: CreateOptions = {}): string {
  const args = ['create', '-q', '-f', opts.format ?? 'qcow2'];
  const o = Object.entries(opts.options ?? {}).map(([k, v]) => `${k}=${v}`);
  if (o.length) args.push('-o', o.join(','));
  if (opts.backing) args.push('-b', opts.backing);
  if (opts.backingFormat) args.push('-F', opts.backingFormat);
  args.push(file);
  if (size !== undefined) args.push(String(size));
  qemuImg(...args);
  return file;
}

/** `qemu-img convert -O raw` into `out`; returns the raw bytes. */
export function qemuToRaw(img: string, out: string): Buffer {
  qemuImg('convert', '-O', 'raw', img, out);
  return fs.readFileSync(out);
}

/** Reads `len` bytes at `off` of a file. */
export function readBytes(file: string, off: number, len: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(len);
    const n = fs.readSync(fd, b, 0, len, off);
    return b.subarray(0, n);
  } finally {
    fs.closeSync(fd);
  }
}

/** Overwrites bytes of a file in place (for poking corruptions into a valid image). */
export function pokeBytes(file: string, off: number, bytes: Uint8Array): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, bytes, 0, bytes.length, off);
  } finally {
    fs.closeSync(fd);
  }
}

/** Big-endian u64 as bytes (for poking table entries). */
export function be64(v: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  return b;
}

/** Big-endian u32 as bytes. */
export function be32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}
