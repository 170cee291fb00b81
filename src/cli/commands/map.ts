/**
 * `vblk map [-f FMT] [--output=human|json] [--start-offset=OFF] [--max-length=LEN] IMG`: the
 * allocation map, printed exactly like `qemu-img map` (JSON: start, length, depth, present, zero,
 * data, offset; adjacent equal runs merged). Exit 0, or 1 on error.
 */
import type { DiskImage } from '../../disk/disk-image';
import { openDiskImage } from '../../disk/open';
import type { BlockStatus } from '../../disk/types';
import { parseArgs, parseFormat, parseSize } from '../args';
import { UsageError, type Command } from '../command';

/** One merged run of the map. */
export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
  filename?: string;
}

function mergeable(a: MapEntry, b: BlockStatus): boolean {
  if (a.depth !== b.depth || a.present !== b.present || a.zero !== b.zero || a.data !== b.data) return false;
  if ((a.offset === undefined) !== (b.offset === undefined)) return false;
  if (a.filename !== b.filename) return false;
  return a.offset === undefined || a.offset + a.length === b.offset;
}

/** Walks the image's block status from `start` for `length` bytes and merges equal runs (qemu's entry_mergeable). */
export async function mapImage(disk: DiskImage, start = 0, length = disk.size - start): Promise<MapEntry[]> {
  const out: MapEntry[] = [];
  const end = Math.min(disk.size, start + length);
  let off = start;
  while (off < end) {
    const s = await disk.blockStatus(off, Math.min(end - off, 1 << 30));
    if (!(s.length > 0)) throw new Error(`block status at ${off} returned an empty run`);
    const last = out[out.length - 1];
    if (last && mergeable(last, s)) last.length += s.length;
    else {
      const e: MapEntry = { start: off, length: s.length, depth: s.depth, present: s.present, zero: s.zero, data: s.data };
      if (s.offset !== undefined) e.offset = s.offset;
      if (s.filename !== undefined) e.filename = s.filename;
      out.push(e);
    }
    off += s.length;
  }
  return out;
}

/** `qemu-img map --output=json` text. */
export function mapJson(entries: readonly MapEntry[]): string {
  const lines = entries.map((e) => {
    const off = e.offset !== undefined ? `, "offset": ${e.offset}` : '';
    return `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}${off}}`;
  });
  return `[${lines.join(',\n')}]\n`;
}

const hx = (n: number): string => (n === 0 ? '0' : '0x' + n.toString(16));

/** `qemu-img map` human text: non-zero data runs with a host offset, contiguous ones in the same file merged. */
export function mapHuman(entries: readonly MapEntry[]): string {
  const rows: { start: number; length: number; offset: number; file: string }[] = [];
  for (const e of entries) {
    if (!e.data || e.zero || e.offset === undefined) continue; // qemu-img: DATA set and ZERO clear
    const file = e.filename ?? '';
    const last = rows[rows.length - 1];
    if (last && last.file === file && last.start + last.length === e.start && last.offset + last.length === e.offset) last.length += e.length;
    else rows.push({ start: e.start, length: e.length, offset: e.offset, file });
  }
  let s = `${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n`;
  for (const r of rows) s += `${hx(r.start).padEnd(16)}${hx(r.length).padEnd(16)}${hx(r.offset).padEnd(16)}${r.file}\n`;
  return s;
}

export const mapCommand: Command = {
  name: 'map',
  summary: 'show which ranges are allocated, zero or data, and where (like qemu-img map)',
  usage: 'map [-f FMT] [--output=human|json] [--start-offset=OFF] [--max-length=LEN] IMG',
  async run(argv, io) {
    const a = parseArgs(argv, { values: 'f', longValues: ['output', 'start-offset', 'max-length'], flags: 'U' });
    const output = a.get('output') ?? 'human';
    if (output !== 'human' && output !== 'json') throw new UsageError(`--output must be human or json, got "${output}"`);
    const [path, extra] = a.positional;
    if (path === undefined || extra !== undefined) throw new UsageError('map needs exactly one image');
    const format = parseFormat(a.get('f'));
    const disk = await openDiskImage(path, { readonly: true, ...(format ? { format } : {}) });
    try {
      const so = a.get('start-offset');
      const ml = a.get('max-length');
      const start = so !== undefined ? parseSize(so, 'start offset') : 0;
      const entries = await mapImage(disk, start, ml !== undefined ? parseSize(ml, 'max length') : undefined);
      io.stdout.write(output === 'json' ? mapJson(entries) : mapHuman(entries));
      return 0;
    } finally {
      await disk.close();
    }
  },
};
