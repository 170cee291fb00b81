import { expect } from 'chai';
import * as path from 'node:path';
import { requireQemu, run } from '../helpers/qemu';

describe('make demo, part 1 (scripts/demo-disk.sh)', function () {
  before(function () {
    requireQemu(this);
  });

  it('builds a qcow2 chain with qemu tools and proves vblk reads it byte for byte', () => {
    const root = path.resolve(__dirname, '../../..');
    const r = run('bash', [path.join(root, 'scripts/demo-disk.sh')], { cwd: root });
    expect(r.stderr).to.equal('');
    expect(r.status).to.equal(0);
    expect(r.stdout).to.match(/map: identical to qemu-img map/);
    expect(r.stdout).to.match(/all patterns verified/);
    expect(r.stdout).to.match(/contents match byte for byte/);
    expect(r.stdout.trimEnd().endsWith('demo OK')).to.equal(true);
  });
});
