/**
 * Option parsing for vblk commands, in the style of qemu-img's getopt_long: short options that
 * may be bundled (`-rq`), short options with a value (`-f qcow2`, `-fqcow2`), long options with
 * `=value` or a following value, `--` to end options. Plus qemu-img's size syntax.
 */
import { UsageError } from './command';

/** Declares the options a command accepts. */
export interface OptionSpec {
  /** Short options without a value, e.g. "rqp". */
  readonly flags?: string;
  /** Short options with a value, e.g. "fOc". */
  readonly values?: string;
  /** Long options without a value, e.g. ["help", "strict"]. */
  readonly longFlags?: readonly string[];
  /** Long options with a value, e.g. ["output", "pattern"]. */
  readonly longValues?: readonly string[];
}

/** Parsed command line: every option's values in order (flags get "" per occurrence). */
export interface ParsedArgs {
  readonly options: ReadonlyMap<string, readonly string[]>;
  readonly positional: readonly string[];
  /** Last value of an option, if given. */
  get(name: string): string | undefined;
  /** Every value of a repeatable option (-c ...). */
  all(name: string): readonly string[];
  has(name: string): boolean;
}

export function parseArgs(argv: readonly string[], spec: OptionSpec): ParsedArgs {
  const options = new Map<string, string[]>();
  const positional: string[] = [];
  const add = (k: string, v: string): void => {
    const l = options.get(k);
    if (l) l.push(v);
    else options.set(k, [v]);
  };
  const flags = spec.flags ?? '';
  const values = spec.values ?? '';
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] ?? '';
    if (a === '--') {
      positional.push(...argv.slice(i + 1));
      break;
    }
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      const name = a.slice(2, eq < 0 ? undefined : eq);
      if (spec.longValues?.includes(name)) {
        if (eq >= 0) add(name, a.slice(eq + 1));
        else {
          const v = argv[++i];
          if (v === undefined) throw new UsageError(`option --${name} needs a value`);
          add(name, v);
        }
      } else if (spec.longFlags?.includes(name) || name === 'help') {
        if (eq >= 0) throw new UsageError(`option --${name} takes no value`);
        add(name, '');
      } else throw new UsageError(`unknown option --${name}`);
      continue;
    }
    if (a.startsWith('-') && a.length > 1) {
      for (let j = 1; j < a.length; j++) {
        const c = a[j] ?? '';
        if (flags.includes(c)) add(c, '');
        else if (values.includes(c)) {
          let v: string | undefined = a.slice(j + 1);
          if (v === '') v = argv[++i];
          if (v === undefined) throw new UsageError(`option -${c} needs a value`);
          add(c, v);
          break;
        } else if (c === 'h') add('help', '');
        else throw new UsageError(`unknown option -${c}`);
      }
      continue;
    }
    positional.push(a);
  }
  return {
    options,
    positional,
    get: (n) => {
      const l = options.get(n);
      return l ? l[l.length - 1] : undefined;
    },
    all: (n) => options.get(n) ?? [],
    has: (n) => options.has(n),
  };
}

const SUFFIX: Record<string, number> = { '': 1, b: 1, B: 1, k: 2 ** 10, K: 2 ** 10, m: 2 ** 20, M: 2 ** 20, g: 2 ** 30, G: 2 ** 30, t: 2 ** 40, T: 2 ** 40, p: 2 ** 50, P: 2 ** 50 };

/**
 * Parses a size like qemu-img: a decimal (or 0x hex) number with an optional binary suffix
 * k/M/G/T/P (case-insensitive, powers of 1024); fractional values with a suffix are allowed
 * ("1.5G"). The result must be a safe integer.
 */
export function parseSize(s: string, what = 'size'): number {
  const m = /^\s*(0x[0-9a-fA-F]+|\d+(?:\.\d+)?)\s*([a-zA-Z]?)\s*$/.exec(s);
  const mult = m ? SUFFIX[m[2] ?? ''] : undefined;
  if (!m || mult === undefined) throw new UsageError(`invalid ${what} "${s}": use a number with an optional k, M, G or T suffix`);
  const num = m[1] ?? '';
  const v = num.startsWith('0x') ? Number.parseInt(num, 16) : Number.parseFloat(num);
  const bytes = Math.round(v * mult);
  if (!Number.isSafeInteger(bytes)) throw new UsageError(`invalid ${what} "${s}": too large`);
  if (num.includes('.') && mult === 1) throw new UsageError(`invalid ${what} "${s}": fractional bytes`);
  return bytes;
}

/** Parses a non-negative integer option (counts, depths). */
export function parseCount(s: string, what: string): number {
  if (!/^\d+$/.test(s)) throw new UsageError(`invalid ${what} "${s}": expected a non-negative integer`);
  const v = Number(s);
  if (!Number.isSafeInteger(v)) throw new UsageError(`invalid ${what} "${s}": too large`);
  return v;
}

/** Parses a pattern byte like qemu-io -P: decimal or 0x hex, 0..255. */
export function parsePattern(s: string): number {
  const v = /^0x[0-9a-f]+$/i.test(s) ? Number.parseInt(s, 16) : /^\d+$/.test(s) ? Number(s) : NaN;
  if (!(v >= 0 && v <= 255)) throw new UsageError(`invalid pattern "${s}": expected a byte (0..255 or 0x00..0xff)`);
  return v;
}

/** Parses -f/-O format names. */
export function parseFormat(s: string | undefined): 'raw' | 'qcow' | 'qcow2' | undefined {
  if (s === undefined) return undefined;
  if (s === 'raw' || s === 'qcow' || s === 'qcow2') return s;
  throw new UsageError(`unknown format "${s}" (raw, qcow, qcow2)`);
}

/** qemu's size_to_str: "%0.3g %sB" with binary units ("64 MiB", "977 KiB", "0 B"). */
export function humanSize(n: number): string {
  const units = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];
  // frexp(n / (1000/1024)) exponent, then groups of 10 bits: values >= 1000 move to the next unit.
  const x = n / (1000 / 1024);
  const e = x === 0 ? 0 : Math.floor(Math.log2(x)) + 1;
  const i = Math.max(0, Math.trunc((e - 1) / 10));
  const v = n / 2 ** (i * 10);
  return `${String(Number(v.toPrecision(3)))} ${units[i] ?? ''}B`;
}
