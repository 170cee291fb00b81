/**
 * scripts/with-kvm.sh gives a command a usable /dev/kvm: here directly or, forced with
 * VBLK_KVM_NESTED=1 (the path of machines without /dev/kvm), inside a QEMU TCG guest with nested
 * SVM that shares this machine's files. Both paths run on every machine with QEMU; a machine
 * without QEMU fails these tests (it is what `make test` installs).
 */
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { useTempDir } from '../helpers/qemu';
import { skipBecause } from '../helpers/skip';

const SCRIPT = path.resolve(__dirname, '..', '..', '..', 'scripts', 'with-kvm.sh');

function withKvm(args: string[], env: Record<string, string> = {}): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync('bash', [SCRIPT, ...args], { encoding: 'utf8', timeout: 300_000, env: { ...process.env, VBLK_KVM_TIMEOUT: '240', ...env } });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('scripts/with-kvm.sh in a nested QEMU guest (VBLK_KVM_NESTED=1)', function () {
  this.timeout(300_000);
  const tmp = useTempDir('vblk-withkvm-');
  let run: { status: number | null; stdout: string; stderr: string } = { status: null, stdout: '', stderr: '' };

  before(function () {
    const marker = path.join(tmp.dir, 'from-guest');
    run = withKvm(['sh', '-c', `test -c /dev/kvm && echo kvm-ok; echo "$VBLK_TEST_VALUE" in "$PWD"; echo to-stderr >&2; echo written > ${marker}; exit 7`], {
      VBLK_KVM_NESTED: '1',
      VBLK_TEST_VALUE: 'it carried over',
    });
  });

  it('the command sees /dev/kvm and its exit status comes back', () => {
    expect(run.status, run.stderr).to.equal(7);
    expect(run.stdout).to.match(/^kvm-ok$/m);
  });

  it('the working directory and the environment carry over', () => {
    expect(run.stdout).to.include(`it carried over in ${process.cwd()}`);
  });

  it("stdout and stderr come back apart, without the guest kernel's messages", () => {
    expect(run.stderr.trim()).to.equal('to-stderr');
    expect(run.stdout.trim().split('\n')).to.have.length(2);
  });

  it('a file the command writes lands on this machine', () => {
    expect(fs.readFileSync(path.join(tmp.dir, 'from-guest'), 'utf8')).to.equal('written\n');
  });

  it('without a command it is a usage error (exit 2)', () => {
    const r = withKvm([]);
    expect(r.status).to.equal(2);
    expect(r.stderr).to.match(/^usage: scripts\/with-kvm.sh CMD/);
  });
});

describe('scripts/with-kvm.sh where /dev/kvm is usable', () => {
  it('runs the command directly and returns its status', function () {
    if (!fs.existsSync('/dev/kvm')) skipBecause(this, 'no /dev/kvm on this machine: the nested suite above runs with-kvm.sh here');
    const r = withKvm(['sh', '-c', 'echo direct; exit 3']);
    expect(r.status).to.equal(3);
    expect(r.stdout).to.equal('direct\n');
  });
});
