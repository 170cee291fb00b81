/**
 * `vblk check [-f qcow2] [--output=human|json] [-r leaks|all] [-q] IMG`: vblk's own consistency
 * check of a qcow2 image (src/disk/qcow/check.ts), with qemu-img check's output and exit codes:
 * 0 clean (or clean after repair), 1 the check could not be completed, 2 corruptions, 3 leaks
 * only, 63 the format cannot be checked (raw, qcow).
 */
import { checkQcow2, checkExitCode, type CheckProgress, type CheckResult, type RepairMode } from '../../disk/qcow/check';
import { NodeImageFile } from '../../disk/file';
import { probeFormat } from '../../disk/open';
import { parseArgs, parseFormat } from '../args';
import { UsageError, type Command, type CliIO } from '../command';

/** qemu-img's JSON object (same keys, same order). */
export function checkJson(path: string, r: CheckResult): Record<string, unknown> {
  const o: Record<string, unknown> = { 'image-end-offset': r.imageEndOffset, 'total-clusters': r.totalClusters, 'check-errors': r.checkErrors };
  if (r.corruptions) o['corruptions'] = r.corruptions;
  if (r.leaks) o['leaks'] = r.leaks;
  if (r.corruptionsFixed) o['corruptions-fixed'] = r.corruptionsFixed;
  if (r.leaksFixed) o['leaks-fixed'] = r.leaksFixed;
  o['allocated-clusters'] = r.allocatedClusters;
  o['filename'] = path;
  o['format'] = 'qcow2';
  if (r.fragmentedClusters) o['fragmented-clusters'] = r.fragmentedClusters;
  if (r.compressedClusters) o['compressed-clusters'] = r.compressedClusters;
  return o;
}

function pct(a: number, b: number): string {
  return b === 0 ? '0.00' : ((a / b) * 100).toFixed(2);
}

/** qemu-img's human summary. */
export function checkText(r: CheckResult, fix: RepairMode | undefined): string {
  let s = '';
  if (fix && (r.leaksFixed || r.corruptionsFixed)) {
    s += `The following inconsistencies were found and repaired:\n\n    ${r.leaksFixed} leaked clusters\n    ${r.corruptionsFixed} corruptions\n\nDouble checking the fixed image now...\n`;
  }
  if (r.corruptions === 0 && r.leaks === 0 && r.checkErrors === 0) s += 'No errors were found on the image.\n';
  else {
    if (r.corruptions) s += `\n${r.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    if (r.leaks) s += `\n${r.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    if (r.checkErrors) s += `\n${r.checkErrors} internal errors have occurred during the check.\n`;
  }
  if (r.totalClusters > 0 && r.checkErrors === 0) {
    s += `${r.allocatedClusters}/${r.totalClusters} = ${pct(r.allocatedClusters, r.totalClusters)}% allocated, ${pct(r.fragmentedClusters, r.allocatedClusters)}% fragmented, ${pct(r.compressedClusters, r.allocatedClusters)}% compressed clusters\n`;
    s += `Image end offset: ${r.imageEndOffset}\n`;
  }
  return s;
}

async function formatOf(path: string): Promise<string> {
  const f = await NodeImageFile.open(path, { writable: false });
  try {
    return (await probeFormat(f)).format;
  } finally {
    await f.close();
  }
}

function report(io: CliIO, path: string, r: CheckResult, fix: RepairMode | undefined, json: boolean, quiet: boolean): void {
  for (const m of r.messages) io.stderr.write(m + '\n');
  if (json) io.stdout.write(JSON.stringify(checkJson(path, r), null, 4) + '\n');
  else if (!quiet) io.stdout.write(checkText(r, fix));
}

/**
 * Progress of a long check on a TTY (stderr, so stdout stays qemu-img's report): the share of
 * the active L1 table walked, rewritten in place at most every 0.5% and erased when done.
 */
function checkProgress(io: CliIO, wanted: boolean): CheckProgress | undefined {
  if (!wanted || io.stderr.isTTY !== true) return undefined;
  let last = -1;
  return (done, total) => {
    const pct = (done / total) * 100;
    if (pct - last < 0.5 && done < total) return;
    last = pct;
    io.stderr.write(`    (${pct.toFixed(2)}/100%)${done === total ? '\r                \r' : '\r'}`);
  };
}

export const checkCommand: Command = {
  name: 'check',
  summary: 'check a qcow2 image for leaks and corruption (-r repairs)',
  usage: 'check [-q] [-f qcow2] [--output=human|json] [-r leaks|all] IMG',
  async run(argv, io) {
    const a = parseArgs(argv, { values: 'fr', flags: 'qU', longValues: ['output'] });
    const [path, extra] = a.positional;
    if (path === undefined || extra !== undefined) throw new UsageError('check needs exactly one image');
    const output = a.get('output') ?? 'human';
    if (output !== 'human' && output !== 'json') throw new UsageError(`invalid --output "${output}": human or json`);
    const r = a.get('r');
    if (r !== undefined && r !== 'leaks' && r !== 'all') throw new UsageError(`invalid -r "${r}": leaks or all`);
    const fix: RepairMode | undefined = r;
    const fmt = parseFormat(a.get('f')) ?? (await formatOf(path));
    if (fmt !== 'qcow2') {
      io.stderr.write(`vblk: This image format (${fmt}) does not support checks\n`);
      return 63;
    }
    let res: CheckResult;
    try {
      res = await checkQcow2(path, fix, checkProgress(io, output === 'human' && !a.has('q')));
    } catch (e) {
      io.stderr.write(`vblk: Could not check ${path}: ${e instanceof Error ? e.message : String(e)}\n`);
      return 1;
    }
    report(io, path, res, fix, output === 'json', a.has('q'));
    return checkExitCode(res);
  },
};
