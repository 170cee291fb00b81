/**
 * `vblk create -f raw|qcow2|qcow [-o OPTIONS] [-b BACKING -F FMT] IMG [SIZE]`: a new image, as
 * `qemu-img create`. qcow2 defaults: compat=1.1, cluster_size=64k, refcount_bits=16. Options:
 * cluster_size, compat (0.10 | 1.1), lazy_refcounts (on | off), refcount_bits,
 * preallocation (off | metadata), backing_file, backing_fmt. Exit 0, or 1 on an error.
 */
import { createImage, type CreateOptions } from '../../disk/qcow/create';
import { parseArgs, parseFormat, parseSize } from '../args';
import { UsageError, type Command } from '../command';

/** Parses `-o k=v,k=v` groups into a map (a bare key means "on"). */
export function parseOptionList(groups: readonly string[]): Map<string, string> {
  const m = new Map<string, string>();
  for (const g of groups) {
    for (const kv of g.split(',')) {
      if (!kv) continue;
      const eq = kv.indexOf('=');
      m.set(eq < 0 ? kv : kv.slice(0, eq), eq < 0 ? 'on' : kv.slice(eq + 1));
    }
  }
  return m;
}

function onOff(v: string, what: string): boolean {
  if (v === 'on' || v === 'true') return true;
  if (v === 'off' || v === 'false') return false;
  throw new UsageError(`invalid ${what} "${v}": expected on or off`);
}

/** Turns `-o` options (qemu-img names) into `CreateOptions` fields; unknown keys are an error. */
export function createOptionsFrom(o: ReadonlyMap<string, string>): Partial<{ -readonly [K in keyof CreateOptions]: CreateOptions[K] }> {
  const out: Partial<{ -readonly [K in keyof CreateOptions]: CreateOptions[K] }> = {};
  for (const [k, v] of o) {
    switch (k) {
      case 'cluster_size':
        out.clusterSize = parseSize(v, 'cluster_size');
        break;
      case 'compat':
        if (v === '0.10' || v === 'v2') out.compat = '0.10';
        else if (v === '1.1' || v === 'v3') out.compat = '1.1';
        else throw new UsageError(`invalid compat "${v}": expected 0.10 or 1.1`);
        break;
      case 'lazy_refcounts':
        out.lazyRefcounts = onOff(v, k);
        break;
      case 'refcount_bits':
        out.refcountBits = Number(v);
        break;
      case 'preallocation':
        if (v !== 'off' && v !== 'metadata') throw new UsageError(`invalid preallocation "${v}": vblk supports off and metadata`);
        out.preallocation = v;
        break;
      case 'backing_file':
        out.backingFile = v;
        break;
      case 'backing_fmt': {
        const f = parseFormat(v);
        if (f) out.backingFormat = f;
        break;
      }
      case 'size':
        out.size = parseSize(v);
        break;
      default:
        throw new UsageError(`unknown create option "${k}" (cluster_size, compat, lazy_refcounts, refcount_bits, preallocation, backing_file, backing_fmt)`);
    }
  }
  return out;
}

export const createCommand: Command = {
  name: 'create',
  summary: 'create a new raw, qcow2 or qcow image',
  usage: 'create [-q] [-f raw|qcow2|qcow] [-o OPTIONS] [-b BACKING [-F FMT]] IMG [SIZE]',
  async run(argv) {
    const a = parseArgs(argv, { values: 'foBbF', flags: 'qu' });
    const [path, sizeText, extra] = a.positional;
    if (path === undefined || extra !== undefined) throw new UsageError('create needs an image name and an optional size');
    const format = parseFormat(a.get('f') ?? 'raw') ?? 'raw';
    const opts: { -readonly [K in keyof CreateOptions]: CreateOptions[K] } = { format, ...createOptionsFrom(parseOptionList(a.all('o'))) };
    const backing = a.get('b') ?? a.get('B');
    if (backing !== undefined) opts.backingFile = backing;
    const bfmt = parseFormat(a.get('F'));
    if (bfmt) opts.backingFormat = bfmt;
    if (sizeText !== undefined) opts.size = parseSize(sizeText);
    await createImage(path, opts);
    return 0;
  },
};
