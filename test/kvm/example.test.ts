/**
 * examples/embed-kvm.ts is documentation that must keep working: run the compiled example against
 * a real disk under /dev/kvm and check what the guest reports through it.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { expect } from 'chai';
import { kvmUnavailableReason } from '../../src/kvm/kvm';
import { defaultGuestImage } from '../../src/kvm/run-guest';
import { makeTempDir, run, type TempDir } from '../helpers/qemu';
import { skipBecause } from '../helpers/skip';

const EXAMPLE = path.resolve(__dirname, '..', '..', 'examples', 'embed-kvm.js');

describe('examples/embed-kvm.ts (real /dev/kvm)', function () {
  this.timeout(60000);
  let tmp: TempDir | undefined;
  before(function () {
    const why = kvmUnavailableReason() ?? (fs.existsSync(defaultGuestImage()) ? null : `${defaultGuestImage()} missing (run \`make guest-kvm\`)`);
    if (why !== null) {
      skipBecause(this, why);
    }
    tmp = makeTempDir('vblk-example-');
  });
  after(() => tmp?.cleanup());

  it('boots the test guest on a raw disk: every line the guest reports is printed and it exits 0', function () {
    const disk = tmp?.file('disk.raw') ?? '';
    fs.writeFileSync(disk, Buffer.alloc(1 << 20));
    const r = run(process.execPath, [EXAMPLE, disk]);
    expect(r.status, r.stdout + r.stderr).to.equal(0);
    expect(r.stdout).to.match(/^PASS probe magic=virt version=2 device=block$/m);
    expect(r.stdout).to.match(/^PASS read-past-end /m);
    expect(r.stdout).to.match(/^DONE pass=\d+ fail=0$/m);
    expect(r.stdout).to.not.match(/^FAIL /m);
  });

  it('without a disk argument prints its usage and exits 1', function () {
    const r = run(process.execPath, [EXAMPLE]);
    expect([r.status, r.stderr]).to.deep.equal([1, 'usage: node build/examples/embed-kvm.js DISK-IMAGE\n']);
  });
});
