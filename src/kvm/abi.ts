/**
 * The KVM user-space ABI (x86-64) that vblk uses, written once: ioctl numbers, capability and
 * exit-reason numbers, struct sizes and field offsets from <linux/kvm.h>, plus encoders and
 * decoders for the structs. test/kvm/abi.test.ts compiles a C program against the real header and
 * checks every value in `KVM_ABI_FACTS` against it.
 */

/** The only stable KVM API version (KVM_GET_API_VERSION must return it). */
export const KVM_API_VERSION = 12;

/** ioctl request numbers (_IO/_IOR/_IOW with type 0xAE). */
export const KVM_IOCTL = {
  GET_API_VERSION: 0xae00,
  CREATE_VM: 0xae01,
  CHECK_EXTENSION: 0xae03,
  GET_VCPU_MMAP_SIZE: 0xae04,
  CREATE_VCPU: 0xae41,
  SET_USER_MEMORY_REGION: 0x4020ae46,
  SET_TSS_ADDR: 0xae47,
  SET_IDENTITY_MAP_ADDR: 0x4008ae48,
  CREATE_IRQCHIP: 0xae60,
  IRQ_LINE: 0x4008ae61,
  IRQFD: 0x4020ae76,
  CREATE_PIT2: 0x4040ae77,
  IOEVENTFD: 0x4040ae79,
  RUN: 0xae80,
  GET_REGS: 0x8090ae81,
  SET_REGS: 0x4090ae82,
  GET_SREGS: 0x8138ae83,
  SET_SREGS: 0x4138ae84,
} as const;

/** KVM_CHECK_EXTENSION capability numbers. */
export const KVM_CAP = {
  IRQCHIP: 0,
  HLT: 1,
  USER_MEMORY: 3,
  SET_TSS_ADDR: 4,
  IRQFD: 32,
  PIT2: 33,
  IOEVENTFD: 36,
  SET_IDENTITY_MAP_ADDR: 37,
  IMMEDIATE_EXIT: 136,
} as const;

/** kvm_run.exit_reason values. */
export const KVM_EXIT = {
  UNKNOWN: 0,
  EXCEPTION: 1,
  IO: 2,
  HYPERCALL: 3,
  DEBUG: 4,
  HLT: 5,
  MMIO: 6,
  IRQ_WINDOW_OPEN: 7,
  SHUTDOWN: 8,
  FAIL_ENTRY: 9,
  INTR: 10,
  INTERNAL_ERROR: 17,
  SYSTEM_EVENT: 24,
} as const;

/** Name of an exit reason, for messages. */
export function exitReasonName(reason: number): string {
  for (const [name, v] of Object.entries(KVM_EXIT)) if (v === reason) return `KVM_EXIT_${name}`;
  return `exit reason ${reason}`;
}

export const KVM_EXIT_IO_IN = 0;
export const KVM_EXIT_IO_OUT = 1;
export const KVM_IOEVENTFD_FLAG_DATAMATCH = 1;
export const KVM_IOEVENTFD_FLAG_PIO = 2;
export const KVM_IOEVENTFD_FLAG_DEASSIGN = 4;
export const KVM_IRQFD_FLAG_DEASSIGN = 1;
export const KVM_PIT_SPEAKER_DUMMY = 1;

/** struct kvm_userspace_memory_region. */
export const MEMORY_REGION = { SIZE: 32, SLOT: 0, FLAGS: 4, GUEST_PHYS_ADDR: 8, MEMORY_SIZE: 16, USERSPACE_ADDR: 24 } as const;
/** struct kvm_irqfd. */
export const IRQFD = { SIZE: 32, FD: 0, GSI: 4, FLAGS: 8, RESAMPLEFD: 12 } as const;
/** struct kvm_ioeventfd. */
export const IOEVENTFD = { SIZE: 64, DATAMATCH: 0, ADDR: 8, LEN: 16, FD: 20, FLAGS: 24 } as const;
/** struct kvm_pit_config. */
export const PIT_CONFIG = { SIZE: 64, FLAGS: 0 } as const;
/** struct kvm_irq_level. */
export const IRQ_LEVEL = { SIZE: 8, IRQ: 0, LEVEL: 4 } as const;

/** struct kvm_regs: 18 u64 in this order. */
export const REG_NAMES = [
  'rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp',
  'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', 'rip', 'rflags',
] as const;
export type RegName = (typeof REG_NAMES)[number];
export type Regs = Record<RegName, bigint>;
export const REGS_SIZE = 144;

/** struct kvm_segment. */
export const SEGMENT = {
  SIZE: 24, BASE: 0, LIMIT: 8, SELECTOR: 12, TYPE: 14, PRESENT: 15, DPL: 16, DB: 17, S: 18, L: 19, G: 20, AVL: 21, UNUSABLE: 22,
} as const;
/** struct kvm_dtable. */
export const DTABLE = { SIZE: 16, BASE: 0, LIMIT: 8 } as const;
/** struct kvm_sregs. */
export const SREGS = {
  SIZE: 312, CS: 0, DS: 24, ES: 48, FS: 72, GS: 96, SS: 120, TR: 144, LDT: 168, GDT: 192, IDT: 208,
  CR0: 224, CR2: 232, CR3: 240, CR4: 248, CR8: 256, EFER: 264, APIC_BASE: 272, INTERRUPT_BITMAP: 280,
} as const;

/** struct kvm_run: the fields vblk reads or writes. */
export const RUN = {
  REQUEST_INTERRUPT_WINDOW: 0, IMMEDIATE_EXIT: 1, EXIT_REASON: 8, READY_FOR_INTERRUPT_INJECTION: 12, IF_FLAG: 13,
  IO_DIRECTION: 32, IO_SIZE: 33, IO_PORT: 34, IO_COUNT: 36, IO_DATA_OFFSET: 40,
  MMIO_PHYS_ADDR: 32, MMIO_DATA: 40, MMIO_LEN: 48, MMIO_IS_WRITE: 52,
  FAIL_ENTRY_REASON: 32, FAIL_ENTRY_CPU: 40,
  INTERNAL_SUBERROR: 32, INTERNAL_NDATA: 36, INTERNAL_DATA: 40,
  HW_EXIT_REASON: 32, SYSTEM_EVENT_TYPE: 32,
} as const;

/**
 * Every value above under the name the C checker (test/kvm/kvm-abi.c) prints, so the test can
 * compare them one by one.
 */
export const KVM_ABI_FACTS: Readonly<Record<string, number>> = {
  KVM_API_VERSION,
  ...Object.fromEntries(Object.entries(KVM_IOCTL).map(([k, v]) => [`KVM_${k}`, v])),
  ...Object.fromEntries(Object.entries(KVM_CAP).map(([k, v]) => [`KVM_CAP_${k}`, v])),
  ...Object.fromEntries(Object.entries(KVM_EXIT).map(([k, v]) => [`KVM_EXIT_${k}`, v])),
  KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT, KVM_IOEVENTFD_FLAG_DATAMATCH, KVM_IOEVENTFD_FLAG_PIO,
  KVM_IOEVENTFD_FLAG_DEASSIGN, KVM_IRQFD_FLAG_DEASSIGN, KVM_PIT_SPEAKER_DUMMY,
  'sizeof kvm_userspace_memory_region': MEMORY_REGION.SIZE,
  'offsetof kvm_userspace_memory_region.slot': MEMORY_REGION.SLOT,
  'offsetof kvm_userspace_memory_region.flags': MEMORY_REGION.FLAGS,
  'offsetof kvm_userspace_memory_region.guest_phys_addr': MEMORY_REGION.GUEST_PHYS_ADDR,
  'offsetof kvm_userspace_memory_region.memory_size': MEMORY_REGION.MEMORY_SIZE,
  'offsetof kvm_userspace_memory_region.userspace_addr': MEMORY_REGION.USERSPACE_ADDR,
  'sizeof kvm_regs': REGS_SIZE,
  'offsetof kvm_regs.rax': REG_NAMES.indexOf('rax') * 8,
  'offsetof kvm_regs.rsp': REG_NAMES.indexOf('rsp') * 8,
  'offsetof kvm_regs.rdi': REG_NAMES.indexOf('rdi') * 8,
  'offsetof kvm_regs.rsi': REG_NAMES.indexOf('rsi') * 8,
  'offsetof kvm_regs.rip': REG_NAMES.indexOf('rip') * 8,
  'offsetof kvm_regs.rflags': REG_NAMES.indexOf('rflags') * 8,
  'sizeof kvm_segment': SEGMENT.SIZE,
  'offsetof kvm_segment.base': SEGMENT.BASE,
  'offsetof kvm_segment.limit': SEGMENT.LIMIT,
  'offsetof kvm_segment.selector': SEGMENT.SELECTOR,
  'offsetof kvm_segment.type': SEGMENT.TYPE,
  'offsetof kvm_segment.present': SEGMENT.PRESENT,
  'offsetof kvm_segment.dpl': SEGMENT.DPL,
  'offsetof kvm_segment.db': SEGMENT.DB,
  'offsetof kvm_segment.s': SEGMENT.S,
  'offsetof kvm_segment.l': SEGMENT.L,
  'offsetof kvm_segment.g': SEGMENT.G,
  'offsetof kvm_segment.avl': SEGMENT.AVL,
  'offsetof kvm_segment.unusable': SEGMENT.UNUSABLE,
  'sizeof kvm_dtable': DTABLE.SIZE,
  'offsetof kvm_dtable.base': DTABLE.BASE,
  'offsetof kvm_dtable.limit': DTABLE.LIMIT,
  'sizeof kvm_sregs': SREGS.SIZE,
  ...Object.fromEntries(
    Object.entries(SREGS).filter(([k]) => k !== 'SIZE').map(([k, v]) => [`offsetof kvm_sregs.${k.toLowerCase()}`, v]),
  ),
  'sizeof kvm_irqfd': IRQFD.SIZE,
  'offsetof kvm_irqfd.fd': IRQFD.FD,
  'offsetof kvm_irqfd.gsi': IRQFD.GSI,
  'offsetof kvm_irqfd.flags': IRQFD.FLAGS,
  'offsetof kvm_irqfd.resamplefd': IRQFD.RESAMPLEFD,
  'sizeof kvm_ioeventfd': IOEVENTFD.SIZE,
  'offsetof kvm_ioeventfd.datamatch': IOEVENTFD.DATAMATCH,
  'offsetof kvm_ioeventfd.addr': IOEVENTFD.ADDR,
  'offsetof kvm_ioeventfd.len': IOEVENTFD.LEN,
  'offsetof kvm_ioeventfd.fd': IOEVENTFD.FD,
  'offsetof kvm_ioeventfd.flags': IOEVENTFD.FLAGS,
  'sizeof kvm_pit_config': PIT_CONFIG.SIZE,
  'offsetof kvm_pit_config.flags': PIT_CONFIG.FLAGS,
  'sizeof kvm_irq_level': IRQ_LEVEL.SIZE,
  'offsetof kvm_irq_level.irq': IRQ_LEVEL.IRQ,
  'offsetof kvm_irq_level.level': IRQ_LEVEL.LEVEL,
  'offsetof kvm_run.request_interrupt_window': RUN.REQUEST_INTERRUPT_WINDOW,
  'offsetof kvm_run.immediate_exit': RUN.IMMEDIATE_EXIT,
  'offsetof kvm_run.exit_reason': RUN.EXIT_REASON,
  'offsetof kvm_run.ready_for_interrupt_injection': RUN.READY_FOR_INTERRUPT_INJECTION,
  'offsetof kvm_run.if_flag': RUN.IF_FLAG,
  'offsetof kvm_run.io.direction': RUN.IO_DIRECTION,
  'offsetof kvm_run.io.size': RUN.IO_SIZE,
  'offsetof kvm_run.io.port': RUN.IO_PORT,
  'offsetof kvm_run.io.count': RUN.IO_COUNT,
  'offsetof kvm_run.io.data_offset': RUN.IO_DATA_OFFSET,
  'offsetof kvm_run.mmio.phys_addr': RUN.MMIO_PHYS_ADDR,
  'offsetof kvm_run.mmio.data': RUN.MMIO_DATA,
  'offsetof kvm_run.mmio.len': RUN.MMIO_LEN,
  'offsetof kvm_run.mmio.is_write': RUN.MMIO_IS_WRITE,
  'offsetof kvm_run.fail_entry.hardware_entry_failure_reason': RUN.FAIL_ENTRY_REASON,
  'offsetof kvm_run.fail_entry.cpu': RUN.FAIL_ENTRY_CPU,
  'offsetof kvm_run.internal.suberror': RUN.INTERNAL_SUBERROR,
  'offsetof kvm_run.internal.ndata': RUN.INTERNAL_NDATA,
  'offsetof kvm_run.internal.data': RUN.INTERNAL_DATA,
  'offsetof kvm_run.hw.hardware_exit_reason': RUN.HW_EXIT_REASON,
  'offsetof kvm_run.system_event.type': RUN.SYSTEM_EVENT_TYPE,
};

// ---- struct codecs ------------------------------------------------------------------------

/** Decodes struct kvm_regs. */
export function decodeRegs(buf: Buffer): Regs {
  const out = {} as Record<RegName, bigint>;
  REG_NAMES.forEach((name, i) => {
    out[name] = buf.readBigUInt64LE(i * 8);
  });
  return out;
}

/** Encodes struct kvm_regs. */
export function encodeRegs(regs: Regs): Buffer {
  const buf = Buffer.alloc(REGS_SIZE);
  REG_NAMES.forEach((name, i) => buf.writeBigUInt64LE(BigInt.asUintN(64, regs[name]), i * 8));
  return buf;
}

/** struct kvm_segment, decoded. */
export interface Segment {
  base: bigint;
  limit: number;
  selector: number;
  type: number;
  present: number;
  dpl: number;
  db: number;
  s: number;
  l: number;
  g: number;
  avl: number;
  unusable: number;
}

/** struct kvm_dtable, decoded. */
export interface DescriptorTable {
  base: bigint;
  limit: number;
}

/** struct kvm_sregs, decoded (interrupt_bitmap kept raw). */
export interface Sregs {
  cs: Segment; ds: Segment; es: Segment; fs: Segment; gs: Segment; ss: Segment; tr: Segment; ldt: Segment;
  gdt: DescriptorTable; idt: DescriptorTable;
  cr0: bigint; cr2: bigint; cr3: bigint; cr4: bigint; cr8: bigint; efer: bigint; apicBase: bigint;
  interruptBitmap: Buffer;
}

const SEGMENT_FIELDS = ['cs', 'ds', 'es', 'fs', 'gs', 'ss', 'tr', 'ldt'] as const;

function decodeSegment(buf: Buffer, off: number): Segment {
  return {
    base: buf.readBigUInt64LE(off + SEGMENT.BASE),
    limit: buf.readUInt32LE(off + SEGMENT.LIMIT),
    selector: buf.readUInt16LE(off + SEGMENT.SELECTOR),
    type: buf.readUInt8(off + SEGMENT.TYPE),
    present: buf.readUInt8(off + SEGMENT.PRESENT),
    dpl: buf.readUInt8(off + SEGMENT.DPL),
    db: buf.readUInt8(off + SEGMENT.DB),
    s: buf.readUInt8(off + SEGMENT.S),
    l: buf.readUInt8(off + SEGMENT.L),
    g: buf.readUInt8(off + SEGMENT.G),
    avl: buf.readUInt8(off + SEGMENT.AVL),
    unusable: buf.readUInt8(off + SEGMENT.UNUSABLE),
  };
}

function encodeSegment(buf: Buffer, off: number, s: Segment): void {
  buf.fill(0, off, off + SEGMENT.SIZE);
  buf.writeBigUInt64LE(s.base, off + SEGMENT.BASE);
  buf.writeUInt32LE(s.limit >>> 0, off + SEGMENT.LIMIT);
  buf.writeUInt16LE(s.selector, off + SEGMENT.SELECTOR);
  buf.writeUInt8(s.type, off + SEGMENT.TYPE);
  buf.writeUInt8(s.present, off + SEGMENT.PRESENT);
  buf.writeUInt8(s.dpl, off + SEGMENT.DPL);
  buf.writeUInt8(s.db, off + SEGMENT.DB);
  buf.writeUInt8(s.s, off + SEGMENT.S);
  buf.writeUInt8(s.l, off + SEGMENT.L);
  buf.writeUInt8(s.g, off + SEGMENT.G);
  buf.writeUInt8(s.avl, off + SEGMENT.AVL);
  buf.writeUInt8(s.unusable, off + SEGMENT.UNUSABLE);
}

/** Decodes struct kvm_sregs. */
export function decodeSregs(buf: Buffer): Sregs {
  const seg = (name: (typeof SEGMENT_FIELDS)[number]): Segment => decodeSegment(buf, SREGS[name.toUpperCase() as Uppercase<typeof name>]);
  return {
    cs: seg('cs'), ds: seg('ds'), es: seg('es'), fs: seg('fs'), gs: seg('gs'), ss: seg('ss'), tr: seg('tr'), ldt: seg('ldt'),
    gdt: { base: buf.readBigUInt64LE(SREGS.GDT + DTABLE.BASE), limit: buf.readUInt16LE(SREGS.GDT + DTABLE.LIMIT) },
    idt: { base: buf.readBigUInt64LE(SREGS.IDT + DTABLE.BASE), limit: buf.readUInt16LE(SREGS.IDT + DTABLE.LIMIT) },
    cr0: buf.readBigUInt64LE(SREGS.CR0),
    cr2: buf.readBigUInt64LE(SREGS.CR2),
    cr3: buf.readBigUInt64LE(SREGS.CR3),
    cr4: buf.readBigUInt64LE(SREGS.CR4),
    cr8: buf.readBigUInt64LE(SREGS.CR8),
    efer: buf.readBigUInt64LE(SREGS.EFER),
    apicBase: buf.readBigUInt64LE(SREGS.APIC_BASE),
    interruptBitmap: Buffer.from(buf.subarray(SREGS.INTERRUPT_BITMAP, SREGS.SIZE)),
  };
}

/** Encodes struct kvm_sregs. */
export function encodeSregs(s: Sregs): Buffer {
  const buf = Buffer.alloc(SREGS.SIZE);
  for (const name of SEGMENT_FIELDS) encodeSegment(buf, SREGS[name.toUpperCase() as Uppercase<typeof name>], s[name]);
  buf.writeBigUInt64LE(s.gdt.base, SREGS.GDT + DTABLE.BASE);
  buf.writeUInt16LE(s.gdt.limit, SREGS.GDT + DTABLE.LIMIT);
  buf.writeBigUInt64LE(s.idt.base, SREGS.IDT + DTABLE.BASE);
  buf.writeUInt16LE(s.idt.limit, SREGS.IDT + DTABLE.LIMIT);
  buf.writeBigUInt64LE(s.cr0, SREGS.CR0);
  buf.writeBigUInt64LE(s.cr2, SREGS.CR2);
  buf.writeBigUInt64LE(s.cr3, SREGS.CR3);
  buf.writeBigUInt64LE(s.cr4, SREGS.CR4);
  buf.writeBigUInt64LE(s.cr8, SREGS.CR8);
  buf.writeBigUInt64LE(s.efer, SREGS.EFER);
  buf.writeBigUInt64LE(s.apicBase, SREGS.APIC_BASE);
  s.interruptBitmap.copy(buf, SREGS.INTERRUPT_BITMAP, 0, SREGS.SIZE - SREGS.INTERRUPT_BITMAP);
  return buf;
}
