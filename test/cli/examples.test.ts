import { expect } from 'chai';
import * as path from 'node:path';
import { run } from '../helpers/qemu';

describe('examples/disk-and-device.ts (the README library walk-through)', function () {
  it('runs: reads through a backing chain, serves a virtio-blk write and read, and checks clean', () => {
    const script = path.resolve(__dirname, '../../examples/disk-and-device.js');
    const r = run(process.execPath, [script]);
    expect(r.stderr).to.equal('');
    expect(r.status).to.equal(0);
    expect(r.stdout.split('\n').filter(Boolean)).to.deep.equal([
      "overlay reads the base's data through the chain: true",
      'virtio-blk write then read of sector 100: OK',
      'vblk check top.qcow2: 0 corruptions, 0 leaks',
    ]);
  });
});
