import { expect } from 'chai';
import { isVblkError } from '../../src/errors';
import { Kvm, kvmUnavailableReason } from '../../src/kvm/kvm';
import { enterLongMode, writeBootTables } from '../../src/kvm/long-mode';
import type { Vm } from '../../src/kvm/vm';
import type { Vcpu } from '../../src/kvm/vcpu';
import { skipBecause } from '../helpers/skip';

const ENTRY = 0x8000;

/** A VM with 1 MiB of RAM at 0 running `code` at ENTRY in long mode (no irqchip: HLT exits). */
function bootCode(code: number[]): { kvm: Kvm; vm: Vm; vcpu: Vcpu } {
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  vm.setTssAddr(0xfffbd000);
  const ram = vm.addRam(0, 1 << 20);
  writeBootTables(ram.buffer);
  Buffer.from(code).copy(ram.buffer, ENTRY);
  const vcpu = vm.createVcpu(0);
  enterLongMode(vcpu, ENTRY, 0x7000);
  return { kvm, vm, vcpu };
}

/** Boots `code`, runs `fn` on its vCPU, and always tears the VM down. */
async function withBootedCode(code: number[], fn: (vcpu: Vcpu) => Promise<void>): Promise<void> {
  const { kvm, vm, vcpu } = bootCode(code);
  try {
    await fn(vcpu);
  } finally {
    vm.close();
    kvm.close();
  }
}

/** The error `vcpu.run()` rejects with (undefined if it resolves). */
async function runError(vcpu: Vcpu): Promise<unknown> {
  try {
    await vcpu.run();
  } catch (e) {
    return e;
  }
  return undefined;
}

describe('KVM vCPU (real /dev/kvm)', function () {
  this.timeout(30000);
  before(function () {
    const why = kvmUnavailableReason();
    if (why !== null) {
      skipBecause(this, why);
    }
  });

  it('Kvm.open() reports API version 12 and the harness capabilities', function () {
    const kvm = Kvm.open();
    try {
      expect(kvm.apiVersion).to.equal(12);
      expect(() => kvm.requireHarnessExtensions()).to.not.throw();
    } finally {
      kvm.close();
    }
  });

  it('runs a 64-bit guest that writes to port 0xE9 and halts (IO exit, then HLT exit)', async function () {
    // mov al,'K'; out 0xe9,al; hlt
    await withBootedCode([0xb0, 0x4b, 0xe6, 0xe9, 0xf4], async (vcpu) => {
      const io = await vcpu.run();
      expect(io.kind).to.equal('io');
      if (io.kind !== 'io') return;
      expect([io.direction, io.port, io.size, io.count, io.data[0]]).to.deep.equal(['out', 0xe9, 1, 1, 0x4b]);
      const hlt = await vcpu.run();
      expect(hlt.kind).to.equal('hlt');
      expect(vcpu.getRegs().rip).to.equal(BigInt(ENTRY + 5));
    });
  });

  it('decodes an MMIO read exit and delivers the value the VMM puts in exit.data', async function () {
    // mov eax,[0x10000000]; out 0xe9,al; hlt
    await withBootedCode([0x8b, 0x04, 0x25, 0x00, 0x00, 0x00, 0x10, 0xe6, 0xe9, 0xf4], async (vcpu) => {
      const mmio = await vcpu.run();
      expect(mmio.kind).to.equal('mmio');
      if (mmio.kind !== 'mmio') return;
      expect([mmio.address, mmio.isWrite, mmio.len]).to.deep.equal([0x10000000, false, 4]);
      mmio.data.writeUInt32LE(0x1234);
      const io = await vcpu.run();
      expect(io.kind === 'io' ? io.data[0] : -1).to.equal(0x34);
    });
  });

  it('turns a triple fault into one E_KVM error naming KVM_EXIT_SHUTDOWN and the rip', async function () {
    // ud2 with no IDT: #UD -> #DF -> triple fault
    await withBootedCode([0x0f, 0x0b], async (vcpu) => {
      const err = await runError(vcpu);
      expect(isVblkError(err, 'E_KVM')).to.equal(true);
      expect((err as Error).message).to.match(/^Cannot run vCPU 0: KVM_EXIT_SHUTDOWN at rip 0x[0-9a-f]+: /);
    });
  });

  it('turns an emulation failure (executing from the MMIO window) into one E_KVM error naming KVM_EXIT_INTERNAL_ERROR', async function () {
    // mov eax, 0x10000000; jmp rax
    await withBootedCode([0xb8, 0x00, 0x00, 0x00, 0x10, 0xff, 0xe0], async (vcpu) => {
      const err = await runError(vcpu);
      expect(isVblkError(err, 'E_KVM')).to.equal(true);
      expect((err as Error).message).to.match(/^Cannot run vCPU 0: KVM_EXIT_INTERNAL_ERROR at rip 0x10000000: KVM internal error: emulation failure/);
    });
  });

  it('kick() interrupts a vCPU spinning in the guest', async function () {
    // jmp $
    await withBootedCode([0xeb, 0xfe], async (vcpu) => {
      const p = vcpu.run();
      await new Promise((r) => setTimeout(r, 50));
      vcpu.kick();
      const exit = await p;
      expect(exit.kind).to.equal('interrupted');
    });
  });

  it('Vm sets up the in-kernel irqchip and PIT, an irqfd per GSI and a removable ioeventfd', function () {
    const kvm = Kvm.open();
    const vm = kvm.createVm();
    try {
      vm.createIrqchip();
      vm.createPit2();
      vm.irqLine(5, 1);
      vm.irqLine(5, 0);
      const irqfd = vm.irqfd(5);
      expect(vm.irqfd(5)).to.equal(irqfd); // one eventfd per GSI
      const ev = vm.addIoEventFd({ addr: 0x10000050, len: 4, datamatch: 0 });
      expect(ev.fd).to.be.greaterThan(2);
      // the same address and datamatch twice is refused by KVM (EEXIST): the error names the ioctl
      expect(() => vm.addIoEventFd({ addr: 0x10000050, len: 4, datamatch: 0 })).to.throw(/^Cannot KVM_IOEVENTFD at 0x10000050: EEXIST$/);
      vm.removeIoEventFd(ev);
      const again = vm.addIoEventFd({ addr: 0x10000050, len: 4, datamatch: 0 });
      expect(again.fd).to.be.greaterThan(2);
    } finally {
      vm.close();
      kvm.close();
    }
  });
});

// Needs neither /dev/kvm nor the native library's KVM calls: runs everywhere.
describe('KVM device errors', function () {
  it('a missing KVM device gives one clear E_KVM line', function () {
    expect(() => Kvm.open('/nonexistent/kvm')).to.throw('Cannot open /nonexistent/kvm: it does not exist (KVM is not available on this host)');
  });
});
