/**
 * Bad input at the command line: every command given bad arguments, a missing file or a corrupt
 * image prints exactly one `vblk: <message>` line on stderr (a usage error ends it with a pointer
 * to `--help`), nothing on stdout, and exits with qemu-img's code (compare: 2, others: 1).
 */
import { expect } from 'chai';
import * as fs from 'node:fs';
import { requireQemu, useTempDir, createImage, pokeBytes, be32 } from '../helpers/qemu';
import { vblk, vblkProcess } from './run-vblk';
import type { ToolResult } from '../helpers/qemu';

/** Asserts the error contract: exit code, empty stdout, exactly one `vblk:` line (usage errors point at --help), no stack. */
function expectErrorLine(r: ToolResult, exit: number, line: string | RegExp, usage: boolean): void {
  expect(r.status, r.stderr).to.equal(exit);
  expect(r.stdout, 'nothing on stdout').to.equal('');
  const lines = r.stderr.split('\n').filter((l) => l !== '');
  const first = usage ? (lines[0] ?? '').replace(/ \(see "vblk \w+ --help"\)$/, '') : lines[0];
  if (usage) expect(lines[0]).to.match(/ \(see "vblk \w+ --help"\)$/);
  if (typeof line === 'string') expect(first).to.equal(line);
  else expect(first).to.match(line);
  expect(lines.slice(1), 'after the error line').to.deep.equal([]);
  expect(r.stderr).to.not.match(/^\s+at /m);
}

describe('vblk CLI: bad input gives one error line and the qemu-img exit code', function () {
  const tmp = useTempDir();
  let good = '';
  let corrupt = '';
  let small = '';
  before(function () {
    requireQemu(this);
    good = createImage(tmp.file('good.qcow2'), '1M');
    corrupt = tmp.file('corrupt.qcow2');
    fs.copyFileSync(good, corrupt);
    pokeBytes(corrupt, 20, be32(32)); // cluster_bits 32
    small = tmp.file('small.raw');
    fs.writeFileSync(small, Buffer.alloc(1 << 20));
  });
  const missing = (): string => tmp.file('missing.img');
  const corruptLine = (): string => `vblk: Cannot open ${corrupt}: invalid qcow2 header: cluster_bits 32 is outside 9..21`;
  const missingLine = (): string => `vblk: Cannot open ${missing()}: no such file`;

  for (const cmd of ['info', 'map', 'bench']) {
    describe(cmd, () => {
      it('no image is a usage error', async () => {
        expectErrorLine(await vblk(cmd), 1, `vblk: ${cmd} needs exactly one image`, true);
      });
      it('two images is a usage error', async () => {
        expectErrorLine(await vblk(cmd, good, good), 1, `vblk: ${cmd} needs exactly one image`, true);
      });
      it('an unknown option is a usage error naming it', async () => {
        expectErrorLine(await vblk(cmd, '--frobnicate', good), 1, 'vblk: unknown option --frobnicate', true);
      });
      it('an unknown format is a usage error naming it', async () => {
        expectErrorLine(await vblk(cmd, '-f', 'vmdk', good), 1, 'vblk: unknown format "vmdk" (raw, qcow, qcow2)', true);
      });
      it('a missing file exits 1 naming it', async () => {
        expectErrorLine(await vblk(cmd, missing()), 1, missingLine(), false);
      });
      it('a directory is refused at open, naming it', async () => {
        expectErrorLine(await vblk(cmd, tmp.dir), 1, `vblk: Cannot open ${tmp.dir}: it is a directory`, false);
      });
      it('a corrupt header exits 1 naming the field', async () => {
        expectErrorLine(await vblk(cmd, corrupt), 1, corruptLine(), false);
      });
    });
  }

  describe('compare (errors exit 2)', () => {
    it('one image is a usage error', async () => {
      expectErrorLine(await vblk('compare', good), 2, 'vblk: compare needs exactly two images', true);
    });
    it('an unknown option is a usage error', async () => {
      expectErrorLine(await vblk('compare', '-x', good, good), 2, 'vblk: unknown option -x', true);
    });
    it('a missing first image', async () => {
      expectErrorLine(await vblk('compare', missing(), good), 2, missingLine(), false);
    });
    it('a corrupt second image', async () => {
      expectErrorLine(await vblk('compare', good, corrupt), 2, corruptLine(), false);
    });
    it('a forced format that does not match', async () => {
      expectErrorLine(await vblk('compare', '-f', 'qcow2', small, good), 2, `vblk: Cannot open ${small} as qcow2: it is not a qcow image (no QFI magic)`, false);
    });
  });

  describe('info and map options', () => {
    it('info --output=xml', async () => {
      expectErrorLine(await vblk('info', '--output=xml', good), 1, 'vblk: --output must be human or json, got "xml"', true);
    });
    it('map --start-offset that is not a size', async () => {
      expectErrorLine(await vblk('map', '--start-offset=abc', good), 1, 'vblk: invalid start offset "abc": use a number with an optional k, M, G or T suffix', true);
    });
    it('map --max-length that is negative', async () => {
      expectErrorLine(await vblk('map', '--max-length=-1', good), 1, 'vblk: invalid max length "-1": use a number with an optional k, M, G or T suffix', true);
    });
  });

  describe('bench options are checked before the image is opened or anything is printed', () => {
    const cases: [string, string[], string][] = [
      ['queue depth 0', ['-d', '0'], 'vblk: invalid queue depth 0: it must be at least 1'],
      ['buffer size 0', ['-s', '0'], 'vblk: invalid buffer size 0: it must be at least 512'],
      ['a buffer size that is not a multiple of 512', ['-s', '100'], 'vblk: invalid buffer size 100: it must be a multiple of 512'],
      ['a step that is not a multiple of 512', ['-S', '1'], 'vblk: invalid step 1: it must be a multiple of 512'],
      ['an offset that is not a multiple of 512', ['-o', '1000'], 'vblk: invalid offset 1000: it must be a multiple of 512'],
      ['a count that is not a number', ['-c', 'abc'], 'vblk: invalid count "abc": expected a non-negative integer'],
      ['a count that is not a safe integer', ['-c', '99999999999999999999'], 'vblk: invalid count "99999999999999999999": too large'],
      ['a pattern that is not a byte', ['-w', '--pattern=300'], 'vblk: invalid pattern "300": expected a byte (0..255 or 0x00..0xff)'],
      ['buffers larger than the cap (depth x size)', ['-d', '4096', '-c', '4096', '-s', '1M'], 'vblk: queue depth 4096 x buffer size 1048576 needs 4294967296 bytes of buffers, more than the 1073741824 allowed'],
    ];
    for (const [what, args, line] of cases) {
      it(what, async () => {
        // The image is missing: the option error must come first.
        expectErrorLine(await vblk('bench', ...args, missing()), 1, line, true);
      });
    }
    it('a request larger than the image prints nothing on stdout', async () => {
      expectErrorLine(await vblk('bench', '-s', '2M', small), 1, 'vblk: request size 2097152 is larger than the image (1048576)', true);
    });
  });

  describe('run options are checked before KVM is touched', () => {
    it('a positional argument', async () => {
      expectErrorLine(await vblk('run', good), 1, `vblk: run takes no positional arguments (got "${good}"); use --disk IMG`, true);
    });
    it('--timeout 0 (every run would fail at once)', async () => {
      expectErrorLine(await vblk('run', '--timeout', '0'), 1, 'vblk: invalid timeout "0": expected 1 to 86400 seconds', true);
    });
    it('--timeout beyond a day (Node timers would overflow and fire at once)', async () => {
      expectErrorLine(await vblk('run', '--timeout', '99999999999'), 1, 'vblk: invalid timeout "99999999999": expected 1 to 86400 seconds', true);
    });
    it('an unknown format', async () => {
      expectErrorLine(await vblk('run', '-f', 'vmdk'), 1, 'vblk: unknown format "vmdk" (raw, qcow, qcow2)', true);
    });
  });

  describe('serve options are checked before the image or the socket is opened', () => {
    const sock = (): string => tmp.file('never.sock');
    it('--poll-max-us that is not a number', async () => {
      expectErrorLine(await vblk('serve', '--socket', sock(), '--poll-max-us', 'fast', missing()), 1, 'vblk: invalid poll-max-us "fast": expected a non-negative integer', true);
    });
    it('--poll-max-us above a second', async () => {
      expectErrorLine(await vblk('serve', '--socket', sock(), '--poll-max-us', '2000000', missing()), 1, 'vblk: --poll-max-us 2000000 is not 0..1000000', true);
    });
    it('--queue-size that is not a power of two', async () => {
      expectErrorLine(await vblk('serve', '--socket', sock(), '--queue-size', '100', missing()), 1, 'vblk: --queue-size 100 is not a power of two in 2..32768', true);
    });
  });

  it('the compiled entry prints a corrupt image error as one line without a stack trace', () => {
    expectErrorLine(vblkProcess('map', '--output=json', corrupt), 1, corruptLine(), false);
  });
});
