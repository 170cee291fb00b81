/**
 * `vblk info [-f FMT] [--output=human|json] [--backing-chain] IMG`: what `qemu-img info` prints,
 * with the same field names in JSON. Exit 0, or 1 when the image cannot be opened.
 */
import * as fs from 'node:fs';
import type { DiskImage } from '../../disk/disk-image';
import { openDiskImage } from '../../disk/open';
import type { ImageDescription } from '../../disk/types';
import { combinePath } from '../../disk/qcow/qcow2';
import { parseArgs, parseFormat, humanSize } from '../args';
import { UsageError, type Command } from '../command';

/** qemu-img info's JSON object for one image, in qemu's key order. */
export function infoJson(path: string, d: ImageDescription, actualSize: number | undefined): Record<string, unknown> {
  const o: Record<string, unknown> = {};
  if (d.backingFormat !== undefined) o['backing-filename-format'] = d.backingFormat;
  o['virtual-size'] = d.virtualSize;
  o['filename'] = path;
  if (d.clusterSize !== undefined) o['cluster-size'] = d.clusterSize;
  o['format'] = d.format;
  if (actualSize !== undefined) o['actual-size'] = actualSize;
  if (d.formatSpecific !== undefined) o['format-specific'] = d.formatSpecific;
  if (d.backingFile !== undefined) {
    o['full-backing-filename'] = d.fullBackingFilename ?? d.backingFile;
    o['backing-filename'] = d.backingFile;
  }
  o['dirty-flag'] = d.dirty ?? false;
  return o;
}

const SPECIFIC_LABELS: Record<string, string> = {
  compat: 'compat',
  'compression-type': 'compression type',
  'lazy-refcounts': 'lazy refcounts',
  'refcount-bits': 'refcount bits',
  corrupt: 'corrupt',
  'extended-l2': 'extended l2',
};

/** qemu-img info's human text for one image. */
export function infoText(path: string, d: ImageDescription, actualSize: number | undefined): string {
  const lines = [`image: ${path}`, `file format: ${d.format}`, `virtual size: ${humanSize(d.virtualSize)} (${d.virtualSize} bytes)`];
  if (actualSize !== undefined) lines.push(`disk size: ${humanSize(actualSize)}`);
  if (d.clusterSize !== undefined) lines.push(`cluster_size: ${d.clusterSize}`);
  if (d.backingFile !== undefined) {
    const full = d.fullBackingFilename ?? d.backingFile;
    lines.push(full !== d.backingFile ? `backing file: ${d.backingFile} (actual path: ${full})` : `backing file: ${d.backingFile}`);
    if (d.backingFormat !== undefined) lines.push(`backing file format: ${d.backingFormat}`);
  }
  if (d.dirty) lines.push('cleanly shut down: no');
  const fs = d.formatSpecific as { data?: Record<string, unknown> } | undefined;
  if (fs?.data) {
    lines.push('Format specific information:');
    for (const [k, v] of Object.entries(fs.data)) lines.push(`    ${SPECIFIC_LABELS[k] ?? k}: ${String(v)}`);
  }
  return lines.join('\n') + '\n';
}

function actualSize(path: string): number | undefined {
  try {
    return fs.statSync(path).blocks * 512;
  } catch {
    return undefined;
  }
}

export const infoCommand: Command = {
  name: 'info',
  summary: 'show format, virtual size, cluster size, backing file and feature bits',
  usage: 'info [-f FMT] [--output=human|json] [--backing-chain] IMG',
  async run(argv, io) {
    const a = parseArgs(argv, { values: 'f', longValues: ['output'], longFlags: ['backing-chain'], flags: 'U' });
    const output = a.get('output') ?? 'human';
    if (output !== 'human' && output !== 'json') throw new UsageError(`--output must be human or json, got "${output}"`);
    const [path, extra] = a.positional;
    if (path === undefined || extra !== undefined) throw new UsageError('info needs exactly one image');
    const chain = a.has('backing-chain');
    const format = parseFormat(a.get('f'));
    const disk = await openDiskImage(path, { readonly: true, noBacking: !chain, ...(format ? { format } : {}) });
    try {
      const layers: { path: string; d: ImageDescription }[] = [];
      let cur: DiskImage | undefined = disk;
      let name = path;
      while (cur) {
        const d = cur.describe();
        layers.push({ path: name, d });
        if (!chain || d.backingFile === undefined) break;
        name = d.fullBackingFilename ?? combinePath(name, d.backingFile);
        cur = (cur.priv as { backing?: DiskImage }).backing;
      }
      if (output === 'json') {
        const objs = layers.map((l) => infoJson(l.path, l.d, actualSize(l.path)));
        io.stdout.write(JSON.stringify(chain ? objs : objs[0], null, 4) + '\n');
      } else {
        io.stdout.write(layers.map((l) => infoText(l.path, l.d, actualSize(l.path))).join('\n'));
      }
      return 0;
    } finally {
      await disk.close();
    }
  },
};
