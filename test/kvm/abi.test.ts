import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'chai';
import { DTABLE, KVM_ABI_FACTS, SEGMENT, SREGS, decodeSregs, encodeSregs } from '../../src/kvm/abi';
import { skipBecause } from '../helpers/skip';

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
        skipBecause(this, `cannot compile ${src} against <linux/kvm.h> (${(e as Error).message.split('\n')[0]})`);
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

});

// Pure codec checks: they need neither a C compiler nor /dev/kvm, so they never skip.
describe('kvm_sregs codec (src/kvm/abi.ts)', function () {
  it('every decoded kvm_sregs field survives encodeSregs then decodeSregs', function () {
    const b = Buffer.alloc(SREGS.SIZE);
    for (let i = 0; i < b.length; i++) b[i] = (i * 37 + 11) & 0xff;
    // Compared field by field, not byte for byte: padding bytes carry no meaning and encode as 0.
    expect(decodeSregs(encodeSregs(decodeSregs(b)))).to.deep.equal(decodeSregs(b));
  });

  it('encodeSregs writes every byte of the struct except padding (no field is dropped on the way out)', function () {
    const b = Buffer.alloc(SREGS.SIZE);
    for (let i = 0; i < b.length; i++) b[i] = (i * 37 + 11) & 0xff;
    const out = encodeSregs(decodeSregs(b));
    // Padding: byte 23 of each 24-byte kvm_segment (after `unusable`), bytes 10-15 of each kvm_dtable.
    const padding = new Set<number>();
    for (const seg of [SREGS.CS, SREGS.DS, SREGS.ES, SREGS.FS, SREGS.GS, SREGS.SS, SREGS.TR, SREGS.LDT]) padding.add(seg + SEGMENT.SIZE - 1);
    for (const dt of [SREGS.GDT, SREGS.IDT]) for (let i = DTABLE.LIMIT + 2; i < DTABLE.SIZE; i++) padding.add(dt + i);
    const droppedField = [...out.keys()].filter((i) => out[i] !== b[i] && !padding.has(i));
    expect(droppedField, 'offsets outside padding that did not survive').to.deep.equal([]);
  });
});
