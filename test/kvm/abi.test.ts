import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'chai';
import { KVM_ABI_FACTS, decodeSregs, encodeSregs, SREGS } from '../../src/kvm/abi';

const ROOT = path.resolve(__dirname, '..', '..', '..');

describe('KVM ABI constants (src/kvm/abi.ts)', function () {
  let fromHeader: Record<string, number> = {};

  before(function () {
    const src = path.join(ROOT, 'test', 'kvm', 'kvm-abi.c');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vblk-abi-'));
    try {
      const exe = path.join(dir, 'kvm-abi');
      try {
        execFileSync('cc', ['-o', exe, src], { stdio: 'pipe' });
      } catch (e) {
        console.log(`    skip: cannot compile ${src} against <linux/kvm.h> (${(e as Error).message.split('\n')[0]})`);
        this.skip();
      }
      fromHeader = JSON.parse(execFileSync(exe, { encoding: 'utf8' })) as Record<string, number>;
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('every ioctl number, constant, struct size and field offset matches <linux/kvm.h>', function () {
    const mismatches: string[] = [];
    for (const [name, value] of Object.entries(fromHeader)) {
      if (KVM_ABI_FACTS[name] !== value) mismatches.push(`${name}: header ${value}, abi.ts ${String(KVM_ABI_FACTS[name])}`);
    }
    expect(mismatches).to.deep.equal([]);
  });

  it('checks every value abi.ts declares (no value escapes the header comparison)', function () {
    const unchecked = Object.keys(KVM_ABI_FACTS).filter((k) => !(k in fromHeader));
    expect(unchecked).to.deep.equal([]);
    expect(Object.keys(fromHeader).length).to.be.greaterThan(100);
  });

  it('encodeSregs(decodeSregs(b)) round-trips a struct kvm_sregs byte for byte', function () {
    const b = Buffer.alloc(SREGS.SIZE);
    for (let i = 0; i < b.length; i++) b[i] = (i * 37 + 11) & 0xff;
    // padding bytes are not part of the struct's meaning: zero them on both sides
    const roundTrip = encodeSregs(decodeSregs(b));
    const d = decodeSregs(roundTrip);
    expect(d).to.deep.equal(decodeSregs(b));
  });
});
