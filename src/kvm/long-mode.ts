import type { Regs, Segment, Sregs } from './abi';
import type { Vcpu } from './vcpu';

/**
 * Starting a vCPU directly in 64-bit long mode, the way kvm-hello-world style VMMs do: the VMM
 * writes a flat GDT and identity-mapping page tables into guest RAM and loads the segment and
 * control registers, so the guest's first instruction already runs in 64-bit mode (no real-mode
 * or 32-bit trampoline, which would cost thousands of slow nested-KVM instructions).
 */

/** Where the boot structures live in guest physical memory (all inside the first 64 KiB). */
export const BOOT_LAYOUT = {
  GDT: 0x1000,
  PML4: 0x2000,
  PDPT: 0x3000,
  /** One page directory of 2 MiB pages: identity-maps the first 1 GiB (RAM and the MMIO window). */
  PD: 0x4000,
  /** First byte free for the guest image. */
  END: 0x5000,
} as const;

/** GDT selectors. */
export const GDT_CODE64 = 0x08;
export const GDT_DATA = 0x10;

const CR0_PE = 1n;
const CR0_MP = 1n << 1n;
const CR0_ET = 1n << 4n;
const CR0_NE = 1n << 5n;
const CR0_WP = 1n << 16n;
const CR0_PG = 1n << 31n;
const CR4_PAE = 1n << 5n;
const EFER_LME = 1n << 8n;
const EFER_LMA = 1n << 10n;
const PTE_PRESENT = 1n;
const PTE_WRITE = 2n;
const PDE_LARGE = 1n << 7n;

/**
 * Writes the GDT (null, 64-bit code, data) and the page tables identity-mapping [0, 1 GiB) with
 * 2 MiB pages into `ram`, which must be guest RAM starting at guest physical address 0.
 */
export function writeBootTables(ram: Buffer): void {
  if (ram.length < BOOT_LAYOUT.END) throw new RangeError('guest RAM too small for the boot tables');
  ram.fill(0, BOOT_LAYOUT.GDT, BOOT_LAYOUT.END);
  ram.writeBigUInt64LE(0n, BOOT_LAYOUT.GDT);
  ram.writeBigUInt64LE(0x00af9a000000ffffn, BOOT_LAYOUT.GDT + GDT_CODE64); // P, DPL0, code r/x, L=1, G
  ram.writeBigUInt64LE(0x00cf92000000ffffn, BOOT_LAYOUT.GDT + GDT_DATA); // P, DPL0, data r/w, D/B=1, G
  ram.writeBigUInt64LE(BigInt(BOOT_LAYOUT.PDPT) | PTE_PRESENT | PTE_WRITE, BOOT_LAYOUT.PML4);
  ram.writeBigUInt64LE(BigInt(BOOT_LAYOUT.PD) | PTE_PRESENT | PTE_WRITE, BOOT_LAYOUT.PDPT);
  for (let i = 0; i < 512; i++) {
    ram.writeBigUInt64LE((BigInt(i) << 21n) | PTE_PRESENT | PTE_WRITE | PDE_LARGE, BOOT_LAYOUT.PD + i * 8);
  }
}

function flatSegment(selector: number, code: boolean): Segment {
  return {
    base: 0n,
    limit: 0xffffffff,
    selector,
    type: code ? 0xb : 0x3, // code: execute/read, accessed; data: read/write, accessed
    present: 1,
    dpl: 0,
    db: code ? 0 : 1,
    s: 1,
    l: code ? 1 : 0,
    g: 1,
    avl: 0,
    unusable: 0,
  };
}

/**
 * Loads long-mode segment and control registers (paging with the tables from
 * `writeBootTables`), then rip/rsp, with interrupts disabled (rflags = 0x2).
 */
export function enterLongMode(vcpu: Vcpu, entry: number, stackTop: number): void {
  const s: Sregs = vcpu.getSregs();
  const data = flatSegment(GDT_DATA, false);
  s.cs = flatSegment(GDT_CODE64, true);
  s.ds = data;
  s.es = { ...data };
  s.fs = { ...data };
  s.gs = { ...data };
  s.ss = { ...data };
  s.gdt = { base: BigInt(BOOT_LAYOUT.GDT), limit: 3 * 8 - 1 };
  s.cr3 = BigInt(BOOT_LAYOUT.PML4);
  s.cr4 = CR4_PAE;
  s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
  s.efer = EFER_LME | EFER_LMA;
  vcpu.setSregs(s);
  const regs: Regs = vcpu.getRegs();
  for (const k of Object.keys(regs) as (keyof Regs)[]) regs[k] = 0n;
  regs.rip = BigInt(entry);
  regs.rsp = BigInt(stackTop);
  regs.rflags = 2n;
  vcpu.setRegs(regs);
}
