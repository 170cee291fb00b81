import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'chai';
import { checkKvmApiVersion, kvmUnavailableReason } from '../../src/kvm/kvm';
import { defaultGuestImage } from '../../src/kvm/run-guest';
import { vblk, VBLK_BIN as CLI } from '../cli/run-vblk';
import { skipBecause } from '../helpers/skip';

describe('vblk run', function () {
  this.timeout(120000);

  describe('when KVM is unusable', function () {
    it('a missing device: exit 2 and exactly one error line', async function () {
      const r = await vblk('run', '--kvm', '/nonexistent/kvm');
      expect(r.status).to.equal(2);
      expect(r.stderr).to.equal('vblk: Cannot open /nonexistent/kvm: it does not exist (KVM is not available on this host)\n');
      expect(r.stdout).to.equal('');
    });

    it('no permission on /dev/kvm: exit 2 and one line that says so', function () {
      const setpriv = spawnSync('setpriv', ['--version'], { stdio: 'ignore' }).status === 0;
      if (process.getuid?.() !== 0 || !setpriv || !fs.existsSync('/dev/kvm') || (fs.statSync('/dev/kvm').mode & 0o006) !== 0) {
        skipBecause(this, 'needs root, setpriv and a /dev/kvm that "nobody" cannot open, to run the command as "nobody"');
      }
      const asNobody = ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath];
      if (spawnSync('setpriv', [...asNobody, '-e', `require('fs').accessSync(${JSON.stringify(CLI)}, require('fs').constants.R_OK)`]).status !== 0) {
        skipBecause(this, `user "nobody" cannot read ${CLI}`);
      }
      const r = spawnSync('setpriv', [...asNobody, CLI, 'run'], { encoding: 'utf8' });
      expect(r.status).to.equal(2);
      expect(r.stderr).to.equal("vblk: Cannot open /dev/kvm: permission denied (run as a user in the group that owns /dev/kvm, usually 'kvm')\n");
    });

    it('an API version other than 12 is one clear E_KVM error', function () {
      expect(() => checkKvmApiVersion(11, '/dev/kvm')).to.throw('Cannot use /dev/kvm: KVM API version 11, vblk needs 12');
      expect(() => checkKvmApiVersion(12)).to.not.throw();
    });

    it('a device that is not KVM (/dev/null): exit 2 and one line saying so, naming the failed ioctl', async function () {
      const r = await vblk('run', '--kvm', '/dev/null');
      expect(r.status).to.equal(2);
      expect(r.stderr).to.equal('vblk: Cannot use /dev/null: it is not a KVM device (KVM_GET_API_VERSION failed with ENOTTY)\n');
    });
  });

  describe('on this host', function () {
    let dir = '';
    before(function () {
      const why = kvmUnavailableReason();
      if (why !== null || !fs.existsSync(defaultGuestImage())) {
        skipBecause(this, why ?? `${defaultGuestImage()} missing (run \`make guest-kvm\`)`);
      }
    });
    beforeEach(function () {
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vblk-runcli-'));
    });
    afterEach(function () {
      fs.rmSync(dir, { recursive: true, force: true });
    });

    it('without --disk boots against a fresh temporary image, prints the guest lines and exits 0', async function () {
      const r = await vblk('run');
      expect(r.status, r.stdout + r.stderr).to.equal(0);
      const disk = /^disk: (\S+run\.qcow2) \(qcow2, 32768 sectors, read-write\)$/m.exec(r.stdout)?.[1];
      expect(disk, r.stdout).to.be.a('string');
      expect(fs.existsSync(path.dirname(disk ?? '')), 'the temporary folder is removed afterwards').to.equal(false);
      expect(r.stdout).to.match(/^guest: DONE pass=\d+ fail=0$/m);
      expect(r.stdout).to.match(/^vmm: PASS written-data-on-disk /m);
      expect(r.stdout).to.match(/^\d+ checks passed, 0 failed in \d+ ms/m);
    });

    it('--disk IMG --readonly: the guest sees RO and the image file is unchanged', async function () {
      const file = path.join(dir, 'd.raw');
      fs.writeFileSync(file, Buffer.alloc(1 << 20, 0x61));
      const r = await vblk('run', '--disk', file, '--readonly');
      expect(r.status, r.stdout + r.stderr).to.equal(0);
      expect(r.stdout).to.match(/^guest: PASS features version_1=1 ro=1 /m);
      expect(r.stdout).to.match(/^guest: PASS write-rejected-readonly sector=1 status=1$/m);
      expect(fs.readFileSync(file).every((b) => b === 0x61)).to.equal(true);
    });

    it('a disk smaller than the guest needs (4 sectors) fails a check and exits 1', async function () {
      const file = path.join(dir, 'tiny.raw');
      fs.writeFileSync(file, Buffer.alloc(4 * 512));
      const r = await vblk('run', '--disk', file);
      expect(r.status).to.equal(1);
      expect(r.stdout).to.match(/^guest: FAIL queue /m);
    });
  });
});
