/**
 * `vblk check` on a TTY shows how far the walk of the active L1 table has got (on stderr, so the
 * report on stdout stays qemu-img's), and shows nothing when stderr is not a TTY.
 */
import { expect } from 'chai';
import { main } from '../../src/cli/main';
import { requireQemu, useTempDir, createImage } from '../helpers/qemu';

function sink(isTTY: boolean): { text: string; isTTY: boolean; write(s: string): boolean } {
  return {
    text: '',
    isTTY,
    write(s: string) {
      this.text += s;
      return true;
    },
  };
}

describe('vblk check: progress on a TTY', function () {
  const tmp = useTempDir();
  let image = '';
  before(function () {
    requireQemu(this);
    // 512-byte clusters: 2048 L1 entries for 64 MiB, so the walk reports many steps.
    image = createImage(tmp.file('many-l1.qcow2'), '64M', { options: { cluster_size: '512' } });
  });

  it('prints percentages on stderr up to 100% and erases the line, keeping stdout the plain report', async () => {
    const out = sink(true);
    const err = sink(true);
    const code = await main(['check', image], { stdout: out, stderr: err });
    expect(code).to.equal(0);
    expect(out.text.startsWith('No errors were found on the image.\n')).to.equal(true);
    const steps = err.text.match(/\(\d+\.\d\d\/100%\)/g) ?? [];
    expect(steps.length).to.be.greaterThan(10);
    expect(steps[steps.length - 1]).to.equal('(100.00/100%)');
    expect(err.text.endsWith('\r                \r')).to.equal(true);
  });

  it('prints no progress when stderr is not a TTY', async () => {
    const out = sink(false);
    const err = sink(false);
    expect(await main(['check', image], { stdout: out, stderr: err })).to.equal(0);
    expect(err.text).to.equal('');
  });
});
