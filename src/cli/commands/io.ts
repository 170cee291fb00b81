/**
 * `vblk io [-f FMT] [-r] -c CMD [-c CMD...] IMG`: runs qemu-io style commands on an image, in
 * order. Exit 0 when every command succeeded, 1 on a pattern mismatch or an error (qemu-io exits
 * 1 on a pattern mismatch too).
 *
 * Commands live in `IO_COMMANDS`; adding one (write, discard, flush...) is one entry there. A
 * command declares whether it needs a writable image; the image is opened read-write only when
 * some command does and `-r` was not given.
 */
import type { DiskImage } from '../../disk/disk-image';
import { openDiskImage } from '../../disk/open';
import { readBytesAt } from '../../disk/qcow/chain';
import { DiskError } from '../../errors';
import { parseArgs, parseFormat, parsePattern, parseSize, humanSize, type ParsedArgs } from '../args';
import { UsageError, type Command, type CliIO } from '../command';

/** What an io command gets. */
export interface IoContext {
  readonly disk: DiskImage;
  readonly io: CliIO;
  readonly args: ParsedArgs;
}

/** One `-c` command. */
export interface IoCommand {
  readonly name: string;
  readonly usage: string;
  /** Needs the image open read-write. */
  readonly writes: boolean;
  readonly options: { readonly flags?: string; readonly values?: string };
  /** Resolves to true on success, false on a reported failure (pattern mismatch). */
  run(ctx: IoContext): Promise<boolean>;
}

/** Parses "OFF LEN" of a command and checks the range against the disk. */
export function offLen(ctx: IoContext, what: string): { off: number; len: number } {
  const [o, l, extra] = ctx.args.positional;
  if (o === undefined || l === undefined || extra !== undefined) throw new UsageError(`${what} needs OFFSET and LENGTH`);
  const off = parseSize(o, 'offset');
  const len = parseSize(l, 'length');
  if (off + len > ctx.disk.size) {
    throw new DiskError('E_DISK_RANGE', `Cannot ${what}: ${off}+${len} is past the end of the disk (size ${ctx.disk.size})`);
  }
  return { off, len };
}

/** qemu-io's "N bytes, 1 ops; 00.00 sec (X/sec and Y ops/sec)" line. */
export function statsLine(bytes: number, seconds: number): string {
  const s = Math.max(seconds, 1e-9);
  const sizeText = bytes < 1024 ? `${bytes} bytes` : humanSize(bytes);
  return `${sizeText}, 1 ops; ${seconds.toFixed(2).padStart(5, '0')} sec (${humanSize(bytes / s)}/sec and ${(1 / s).toFixed(4)} ops/sec)`;
}

/** qemu-io's hex dump (`read -v`). */
export function hexDump(buf: Uint8Array, base: number): string {
  let out = '';
  for (let i = 0; i < buf.length; i += 16) {
    const row = buf.subarray(i, Math.min(buf.length, i + 16));
    let hexPart = '';
    let ascii = '';
    for (const b of row) {
      hexPart += b.toString(16).padStart(2, '0') + ' ';
      ascii += /[A-Za-z0-9]/.test(String.fromCharCode(b)) ? String.fromCharCode(b) : '.';
    }
    out += `${(base + i).toString(16).padStart(8, '0')}:  ${hexPart} ${ascii}\n`;
  }
  return out;
}

/** Reads [off, off+len) through the public sector API when aligned, else byte-granular. */
export async function readRange(disk: DiskImage, off: number, buf: Uint8Array): Promise<void> {
  if (off % 512 === 0 && buf.length % 512 === 0) await disk.readSector(off / 512, buf);
  else await readBytesAt(disk, off, buf);
}

export const readIoCommand: IoCommand = {
  name: 'read',
  usage: 'read [-P PATTERN] [-v] [-q] OFFSET LENGTH',
  writes: false,
  options: { flags: 'vq', values: 'P' },
  async run(ctx) {
    const { off, len } = offLen(ctx, 'read');
    const p = ctx.args.get('P');
    const pattern = p !== undefined ? parsePattern(p) : undefined;
    const buf = new Uint8Array(len);
    const t0 = process.hrtime.bigint();
    await readRange(ctx.disk, off, buf);
    const secs = Number(process.hrtime.bigint() - t0) / 1e9;
    let ok = true;
    if (pattern !== undefined) {
      const bad = buf.findIndex((b) => b !== pattern);
      if (bad >= 0) {
        ctx.io.stdout.write(`Pattern verification failed at offset ${off + bad}, ${len - bad} bytes\n`);
        ok = false;
      }
    }
    if (ctx.args.has('v')) ctx.io.stdout.write(hexDump(buf, off));
    if (!ctx.args.has('q')) ctx.io.stdout.write(`read ${len}/${len} bytes at offset ${off}\n${statsLine(len, secs)}\n`);
    return ok;
  },
};

/**
 * Writes `buf` at byte offset `off` through the sector API; an unaligned head or tail sector is
 * read, patched and written back (read-modify-write).
 */
export async function writeRange(disk: DiskImage, off: number, buf: Uint8Array): Promise<void> {
  if (off % 512 === 0 && buf.length % 512 === 0) {
    await disk.writeSector(off / 512, buf);
    return;
  }
  const first = Math.floor(off / 512) * 512;
  const end = Math.ceil((off + buf.length) / 512) * 512;
  const bounce = new Uint8Array(end - first);
  await readBytesAt(disk, first, bounce);
  bounce.set(buf, off - first);
  await disk.writeSector(first / 512, bounce);
}

function doneLine(ctx: IoContext, verb: string, off: number, len: number, secs: number): void {
  if (!ctx.args.has('q')) ctx.io.stdout.write(`${verb} ${len}/${len} bytes at offset ${off}\n${statsLine(len, secs)}\n`);
}

export const writeIoCommand: IoCommand = {
  name: 'write',
  usage: 'write [-P PATTERN] [-z [-u]] [-q] OFFSET LENGTH',
  writes: true,
  options: { flags: 'zuq', values: 'P' },
  async run(ctx) {
    const { off, len } = offLen(ctx, 'write');
    const t0 = process.hrtime.bigint();
    if (ctx.args.has('z')) {
      if (ctx.args.has('P')) throw new UsageError('write -z cannot take a pattern (-P)');
      if (off % 512 !== 0 || len % 512 !== 0) {
        await writeRange(ctx.disk, off, new Uint8Array(len));
      } else {
        await ctx.disk.writeZeroes(off / 512, len / 512, ctx.args.has('u'));
      }
    } else {
      const p = ctx.args.get('P');
      const buf = new Uint8Array(len).fill(p !== undefined ? parsePattern(p) : 0xcd);
      await writeRange(ctx.disk, off, buf);
    }
    doneLine(ctx, 'wrote', off, len, Number(process.hrtime.bigint() - t0) / 1e9);
    return true;
  },
};

export const discardIoCommand: IoCommand = {
  name: 'discard',
  usage: 'discard [-q] OFFSET LENGTH',
  writes: true,
  options: { flags: 'q' },
  async run(ctx) {
    const { off, len } = offLen(ctx, 'discard');
    const t0 = process.hrtime.bigint();
    // Discard is advisory: only the whole sectors inside the range are passed down.
    const first = Math.ceil(off / 512);
    const last = Math.floor((off + len) / 512);
    if (last > first && ctx.disk.canDiscard) await ctx.disk.discard(first, last - first);
    doneLine(ctx, 'discard', off, len, Number(process.hrtime.bigint() - t0) / 1e9);
    return true;
  },
};

export const flushIoCommand: IoCommand = {
  name: 'flush',
  usage: 'flush',
  writes: true,
  options: {},
  async run(ctx) {
    if (ctx.args.positional.length > 0) throw new UsageError('flush takes no arguments');
    await ctx.disk.flush();
    return true;
  },
};

/** Every `-c` command. */
export const IO_COMMANDS: IoCommand[] = [readIoCommand, writeIoCommand, discardIoCommand, flushIoCommand];

/** Splits a -c string into words (no quoting, as qemu-io). */
function words(s: string): string[] {
  return s.trim().split(/\s+/).filter((w) => w.length > 0);
}

function lookup(cmdline: string): { cmd: IoCommand; argv: string[] } {
  const [name, ...argv] = words(cmdline);
  const cmd = IO_COMMANDS.find((c) => c.name === name);
  if (!cmd) throw new UsageError(`unknown io command "${name ?? ''}" (known: ${IO_COMMANDS.map((c) => c.name).join(', ')})`);
  return { cmd, argv };
}

export const ioCommand: Command = {
  name: 'io',
  summary: 'run qemu-io style commands (read, write, discard, flush) on an image',
  usage: 'io [-f FMT] [-r] -c CMD [-c CMD...] IMG   (CMD: read [-P PATTERN] [-v] [-q] OFFSET LENGTH | write [-P PATTERN] [-z [-u]] OFFSET LENGTH | discard OFFSET LENGTH | flush)',
  async run(argv, io) {
    const a = parseArgs(argv, { values: 'fc', flags: 'rU' });
    const [path, extra] = a.positional;
    if (path === undefined || extra !== undefined) throw new UsageError('io needs exactly one image');
    const cmds = a.all('c').map(lookup);
    if (cmds.length === 0) throw new UsageError('io needs at least one -c command');
    // Parse every command's options before opening, so a typo fails without touching the image.
    const parsed = cmds.map(({ cmd, argv: cargv }) => ({ cmd, args: parseArgs(cargv, cmd.options) }));
    const writes = parsed.some((p) => p.cmd.writes);
    if (writes && a.has('r')) throw new UsageError('a write command was given with -r (read-only)');
    const format = parseFormat(a.get('f'));
    const disk = await openDiskImage(path, { readonly: !writes, ...(format ? { format } : {}) });
    let ok = true;
    try {
      for (const p of parsed) {
        try {
          if (!(await p.cmd.run({ disk, io, args: p.args }))) ok = false;
        } catch (e) {
          if ((e as { code?: unknown }).code === 'E_USAGE') throw e;
          io.stderr.write(`vblk: ${p.cmd.name} failed: ${e instanceof Error ? e.message : String(e)}\n`);
          ok = false;
        }
      }
    } finally {
      await disk.close();
    }
    return ok ? 0 : 1;
  },
};
