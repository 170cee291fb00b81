/* Prints, as JSON, the <linux/kvm.h> values that src/kvm/abi.ts hard-codes (test/kvm/abi.test.ts). */
#include <stddef.h>
#include <stdio.h>
#include <linux/kvm.h>

#define NUM(name, v) printf("%s\"%s\": %llu", first ? "" : ",\n", name, (unsigned long long)(v)), first = 0
#define SIZE(t) NUM("sizeof " #t, sizeof(struct t))
#define OFF(t, f) NUM("offsetof " #t "." #f, offsetof(struct t, f))
#define C(x) NUM(#x, x)

int main(void)
{
	int first = 1;
	printf("{\n");
	C(KVM_API_VERSION);
	C(KVM_GET_API_VERSION); C(KVM_CREATE_VM); C(KVM_CHECK_EXTENSION); C(KVM_GET_VCPU_MMAP_SIZE);
	C(KVM_CREATE_VCPU); C(KVM_SET_USER_MEMORY_REGION); C(KVM_SET_TSS_ADDR); C(KVM_SET_IDENTITY_MAP_ADDR);
	C(KVM_CREATE_IRQCHIP); C(KVM_IRQFD); C(KVM_CREATE_PIT2); C(KVM_IOEVENTFD); C(KVM_RUN);
	C(KVM_GET_REGS); C(KVM_SET_REGS); C(KVM_GET_SREGS); C(KVM_SET_SREGS); C(KVM_IRQ_LINE);
	C(KVM_CAP_IRQCHIP); C(KVM_CAP_HLT); C(KVM_CAP_USER_MEMORY); C(KVM_CAP_SET_TSS_ADDR); C(KVM_CAP_PIT2);
	C(KVM_CAP_IRQFD); C(KVM_CAP_IOEVENTFD); C(KVM_CAP_IMMEDIATE_EXIT); C(KVM_CAP_SET_IDENTITY_MAP_ADDR);
	C(KVM_EXIT_UNKNOWN); C(KVM_EXIT_EXCEPTION); C(KVM_EXIT_IO); C(KVM_EXIT_HYPERCALL); C(KVM_EXIT_DEBUG);
	C(KVM_EXIT_HLT); C(KVM_EXIT_MMIO); C(KVM_EXIT_IRQ_WINDOW_OPEN); C(KVM_EXIT_SHUTDOWN);
	C(KVM_EXIT_FAIL_ENTRY); C(KVM_EXIT_INTR); C(KVM_EXIT_INTERNAL_ERROR); C(KVM_EXIT_SYSTEM_EVENT);
	C(KVM_EXIT_IO_IN); C(KVM_EXIT_IO_OUT);
	C(KVM_IOEVENTFD_FLAG_DATAMATCH); C(KVM_IOEVENTFD_FLAG_PIO); C(KVM_IOEVENTFD_FLAG_DEASSIGN);
	C(KVM_IRQFD_FLAG_DEASSIGN); C(KVM_PIT_SPEAKER_DUMMY);
	SIZE(kvm_userspace_memory_region);
	OFF(kvm_userspace_memory_region, slot); OFF(kvm_userspace_memory_region, flags);
	OFF(kvm_userspace_memory_region, guest_phys_addr); OFF(kvm_userspace_memory_region, memory_size);
	OFF(kvm_userspace_memory_region, userspace_addr);
	SIZE(kvm_regs); OFF(kvm_regs, rax); OFF(kvm_regs, rsp); OFF(kvm_regs, rdi); OFF(kvm_regs, rsi); OFF(kvm_regs, rip); OFF(kvm_regs, rflags);
	SIZE(kvm_segment); OFF(kvm_segment, base); OFF(kvm_segment, limit); OFF(kvm_segment, selector);
	OFF(kvm_segment, type); OFF(kvm_segment, present); OFF(kvm_segment, dpl); OFF(kvm_segment, db);
	OFF(kvm_segment, s); OFF(kvm_segment, l); OFF(kvm_segment, g); OFF(kvm_segment, avl); OFF(kvm_segment, unusable);
	SIZE(kvm_dtable); OFF(kvm_dtable, base); OFF(kvm_dtable, limit);
	SIZE(kvm_sregs); OFF(kvm_sregs, cs); OFF(kvm_sregs, ds); OFF(kvm_sregs, es); OFF(kvm_sregs, fs);
	OFF(kvm_sregs, gs); OFF(kvm_sregs, ss); OFF(kvm_sregs, tr); OFF(kvm_sregs, ldt); OFF(kvm_sregs, gdt);
	OFF(kvm_sregs, idt); OFF(kvm_sregs, cr0); OFF(kvm_sregs, cr2); OFF(kvm_sregs, cr3); OFF(kvm_sregs, cr4);
	OFF(kvm_sregs, cr8); OFF(kvm_sregs, efer); OFF(kvm_sregs, apic_base); OFF(kvm_sregs, interrupt_bitmap);
	SIZE(kvm_irqfd); OFF(kvm_irqfd, fd); OFF(kvm_irqfd, gsi); OFF(kvm_irqfd, flags); OFF(kvm_irqfd, resamplefd);
	SIZE(kvm_ioeventfd); OFF(kvm_ioeventfd, datamatch); OFF(kvm_ioeventfd, addr); OFF(kvm_ioeventfd, len);
	OFF(kvm_ioeventfd, fd); OFF(kvm_ioeventfd, flags);
	SIZE(kvm_pit_config); OFF(kvm_pit_config, flags);
	SIZE(kvm_irq_level); OFF(kvm_irq_level, irq); OFF(kvm_irq_level, level);
	OFF(kvm_run, request_interrupt_window); OFF(kvm_run, immediate_exit); OFF(kvm_run, exit_reason);
	OFF(kvm_run, ready_for_interrupt_injection); OFF(kvm_run, if_flag);
	OFF(kvm_run, io.direction); OFF(kvm_run, io.size); OFF(kvm_run, io.port); OFF(kvm_run, io.count); OFF(kvm_run, io.data_offset);
	OFF(kvm_run, mmio.phys_addr); OFF(kvm_run, mmio.data); OFF(kvm_run, mmio.len); OFF(kvm_run, mmio.is_write);
	OFF(kvm_run, fail_entry.hardware_entry_failure_reason); OFF(kvm_run, fail_entry.cpu);
	OFF(kvm_run, internal.suberror); OFF(kvm_run, internal.ndata); OFF(kvm_run, internal.data);
	OFF(kvm_run, hw.hardware_exit_reason); OFF(kvm_run, system_event.type);
	printf("\n}\n");
	return 0;
}
