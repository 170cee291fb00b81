/**
 * How a VMM embeds vblk's virtio-blk device: a KVM VM with guest RAM as a zero-copy Buffer, the
 * device on a virtio-mmio window, kicks through an ioeventfd, interrupts through an irqfd, and a
 * vCPU loop that hands MMIO exits to the transport.
 *
 *   make build && node build/examples/embed-kvm.js disk.img
 *
 * It boots vblk's test guest (build/guest-kvm/blk-guest.bin), which prints PASS/FAIL lines and
 * exits with 0 when every check passed (this program's exit code is the guest's).
 * `vblk run` (src/kvm/run-guest.ts) is the complete version of this loop, with timeouts and
 * checks.
 */
import * as fs from 'node:fs';
import { openDiskImage } from '../src/disk/open';
import { EventFdReader } from '../src/kvm/eventfd-reader';
import { Kvm } from '../src/kvm/kvm';
import { enterLongMode, writeBootTables } from '../src/kvm/long-mode';
import { GUEST_LAYOUT, defaultGuestImage, guestString } from '../src/kvm/run-guest';
import { signalEventFd } from '../src/kvm/vm';
import { GuestMemory } from '../src/memory/guest-memory';
import { MMIO_REG, MMIO_WINDOW_SIZE, VirtioMmioTransport } from '../src/transport/mmio';
import { VirtioBlkDevice } from '../src/virtio/blk';

const { MMIO_BASE, IRQ, PORT_REPORT, PORT_STRING, PORT_EXIT } = GUEST_LAYOUT;

/** Runs the test guest against `imagePath`; resolves to the guest's exit code. */
async function main(imagePath: string): Promise<number> {
  const disk = await openDiskImage(imagePath, { readonly: true });
  const kvm = Kvm.open(); // one clear error line if /dev/kvm is missing or not permitted
  const vm = kvm.createVm();
  vm.setTssAddr(0xfffbd000);
  vm.createIrqchip(); // in-kernel PIC/IOAPIC/LAPIC: irqfd needs it, HLT sleeps in the kernel

  // 1. Guest RAM: anonymous mmap registered as a memory slot; the device sees the same bytes.
  const ram = vm.addRam(0, 2 << 20);
  writeBootTables(ram.buffer);
  fs.readFileSync(defaultGuestImage()).copy(ram.buffer, 0x10000);
  const memory = new GuestMemory([{ guestAddr: 0, buffer: ram.buffer }]);

  // 2. The device and its transport. Used-buffer interrupts: one 8-byte write to the irqfd.
  const device = new VirtioBlkDevice(disk);
  const irqfd = vm.irqfd(IRQ);
  const mmio = new VirtioMmioTransport({ device, memory, raiseInterrupt: () => signalEventFd(irqfd) });

  // 3. Kicks: QueueNotify (value 0) signals an eventfd inside the kernel, no vCPU exit.
  const kick = vm.addIoEventFd({ addr: MMIO_BASE + MMIO_REG.QUEUE_NOTIFY, len: 4, datamatch: 0 });
  const kicks = new EventFdReader(kick.fd, () => mmio.notify(0));

  // 4. One vCPU in long mode; the test guest takes the window base and IRQ in rdi/rsi.
  const vcpu = vm.createVcpu(0);
  enterLongMode(vcpu, 0x10000, 0x80000 - 8);
  const regs = vcpu.getRegs();
  regs.rdi = BigInt(MMIO_BASE);
  regs.rsi = BigInt(IRQ);
  vcpu.setRegs(regs);

  // 5. The run loop: KVM_RUN runs on a worker thread; exits come back here.
  let guestExit: number | undefined;
  while (guestExit === undefined) {
    const exit = await vcpu.run();
    // The guest reports bytes on one port and whole strings (their guest address) on another.
    if (exit.kind === 'io' && exit.port === PORT_REPORT) process.stdout.write(exit.data.toString('latin1'));
    else if (exit.kind === 'io' && exit.port === PORT_STRING && exit.size === 4) process.stdout.write(guestString(ram.buffer, exit.data.readUInt32LE(0)));
    else if (exit.kind === 'io' && exit.port === PORT_EXIT) guestExit = exit.data[0] ?? 1; // the guest is done
    else if (exit.kind === 'mmio') {
      const off = exit.address - MMIO_BASE;
      if (off >= 0 && off < MMIO_WINDOW_SIZE) {
        if (exit.isWrite) mmio.writeBytes(off, exit.data);
        else mmio.readBytes(off, exit.data);
        await mmio.settled(); // a reset finishes before the guest sees Status again
      } else if (!exit.isWrite) {
        exit.data.fill(0xff); // nothing mapped there: reads see all-ones, as on real hardware
      }
    }
  }

  // 6. Tear down in this order: no request may touch RAM after it is unmapped.
  await kicks.stop();
  await device.reset();
  vm.close();
  kvm.close();
  await disk.close();
  return guestExit;
}

const image = process.argv[2];
if (image === undefined) {
  process.stderr.write('usage: node build/examples/embed-kvm.js DISK-IMAGE\n');
  process.exitCode = 1;
} else {
  main(image).then(
    (code) => {
      process.exitCode = code;
    },
    (e: unknown) => {
      process.stderr.write(`embed-kvm: ${e instanceof Error ? e.message : String(e)}\n`);
      process.exitCode = 1;
    },
  );
}
