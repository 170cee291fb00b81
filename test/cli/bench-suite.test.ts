/** The bench framework's pure parts (src/bench/suite.ts): parsing peer output and the table. */
import { expect } from 'chai';
import { fmtValue, formatTable, runSeconds } from '../../src/bench/suite';

describe('bench suite helpers', function () {
  it('runSeconds reads "Run completed in X seconds." from qemu-img bench and vblk bench output', function () {
    expect(runSeconds('Sending 100 read requests, 4096 bytes each, 1 in parallel (starting at offset 0, step size 4096)\nRun completed in 0.125 seconds.\n')).to.equal(0.125);
  });

  it('runSeconds refuses output without that line instead of inventing a time', function () {
    expect(() => runSeconds('qemu-img: Could not open x')).to.throw('no "Run completed" line in: qemu-img: Could not open x');
  });

  it('fmtValue: thousands as "k" from 10000, whole numbers from 100, one decimal below', function () {
    expect([fmtValue(164400), fmtValue(9999), fmtValue(912.4), fmtValue(42.25)]).to.deep.equal(['164.4k', '9999', '912', '42.3']);
  });

  it('formatTable: one aligned row per result with the vblk/peer ratio and the note', function () {
    const t = formatTable([
      { name: 'raw 4k rand read QD1', unit: 'IOPS', peerName: 'qemu-img bench', peer: 200000, vblk: 100000 },
      { name: 'x', unit: 'MiB/s', peerName: 'qsd', peer: 100, vblk: 150, note: 'warm' },
    ]);
    const [head, rule, row1, row2] = t.trimEnd().split('\n');
    expect(rule).to.match(/^[- ]+$/);
    // Columns line up: each value starts where its header does.
    for (const [col, v1, v2] of [['unit', 'IOPS', 'MiB/s'], ['peer value', '200.0k', '100'], ['vblk/peer', '0.50x', '1.50x']] as const) {
      expect([row1?.indexOf(v1), row2?.indexOf(v2)], col).to.deep.equal([head?.indexOf(col), head?.indexOf(col)]);
    }
    expect(row1?.startsWith('raw 4k rand read QD1')).to.equal(true);
    expect(row2?.endsWith('1.50x  (warm)')).to.equal(true);
  });
});
