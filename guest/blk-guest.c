/*
 * vblk KVM test guest: a freestanding 64-bit program that drives a virtio-blk device over
 * virtio-mmio version 2 and reports every check over I/O ports 0xE9/0xEA, one line each:
 *
 *   PASS <check> [detail]      FAIL <check> <detail>      INFO <key> <value...>
 *   DONE pass=<n> fail=<n>     then a write to port 0xF4 ends the run.
 * Bytes go to port 0xE9 (debugcon style, one exit per byte); whole strings go as a 32-bit guest
 * address written to port 0xEA (one exit per string, the VMM reads the bytes from RAM).
 *
 * The VMM (src/kvm/run-guest.ts) starts it directly in long mode at _start with
 *   rdi = base of the virtio-mmio window, rsi = the device's IRQ line (0..7, legacy PIC).
 *
 * Interrupt path: completions are waited for with `sti; hlt`. The device's used-buffer
 * interrupt arrives through KVM's irqfd -> in-kernel PIC -> vector 0x20+irq; the handler reads
 * InterruptStatus and writes InterruptACK (two MMIO exits) and counts the interrupt. Polling
 * InterruptStatus instead would cost one MMIO exit (a round trip through the VMM) per poll; with
 * hlt the vCPU sleeps in the kernel until the irqfd fires. Kicks go to QueueNotify, which the
 * VMM backs with an ioeventfd, so a kick does not leave the kernel either.
 *
 * Kept small on purpose: nested KVM runs guest code at about 1 us per instruction.
 */
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define PORT_REPORT 0xE9
#define PORT_EXIT 0xF4
#define PORT_STRING 0xEA

/* virtio-mmio v2 registers */
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_CONFIG_GENERATION 0x0fc
#define R_QUEUE_DESC_LOW 0x080
#define R_QUEUE_DESC_HIGH 0x084
#define R_QUEUE_DRIVER_LOW 0x090
#define R_QUEUE_DRIVER_HIGH 0x094
#define R_QUEUE_DEVICE_LOW 0x0a0
#define R_QUEUE_DEVICE_HIGH 0x0a4
#define R_CONFIG 0x100

#define ST_ACK 1
#define ST_DRIVER 2
#define ST_DRIVER_OK 4
#define ST_FEATURES_OK 8

#define F_RO (1u << 5)
#define F_FLUSH (1u << 9)
#define F_VERSION_1_HI (1u << 0) /* bit 32 */

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define S_OK 0
#define S_IOERR 1
#define S_UNSUPP 2

#define D_NEXT 1
#define D_WRITE 2

#define QSZ 8

struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct avail { u16 flags; u16 idx; u16 ring[QSZ]; u16 used_event; };
struct used_elem { u32 id; u32 len; };
struct used { u16 flags; u16 idx; struct used_elem ring[QSZ]; u16 avail_event; };
struct blk_hdr { u32 type; u32 reserved; u64 sector; };
struct idt_entry { u16 off0; u16 sel; u8 ist; u8 attr; u16 off1; u32 off2; u32 zero; };
struct interrupt_frame;

static volatile u8 *mmio;
static struct desc ring_desc[QSZ] __attribute__((aligned(16)));
static struct avail ring_avail __attribute__((aligned(4)));
static volatile struct used ring_used __attribute__((aligned(4096)));
static struct blk_hdr hdr;
static volatile u8 status_byte;
static u8 data[1024] __attribute__((aligned(512)));
static u8 idbuf[20];
static struct idt_entry idt[0x30] __attribute__((aligned(16)));
static volatile u32 irq_count;
static u32 hlt_waits;
static u16 last_used;
static u32 n_pass, n_fail;
static u64 capacity;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u32 rd(u32 off) { return *(volatile u32 *)(mmio + off); }
static inline void wr(u32 off, u32 v) { *(volatile u32 *)(mmio + off) = v; }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

/* ---- reporting over port 0xE9 (rep outsb: one exit per string, not per byte) ---------- */

static void out(const char *s, u64 n)
{
	__asm__ volatile("rep outsb" : "+S"(s), "+c"(n) : "d"((u16)PORT_REPORT) : "memory");
}

/* A whole NUL-terminated string in one exit: its address goes to port 0xEA (the VMM reads it). */
static void puts_(const char *s)
{
	__asm__ volatile("outl %0, %1" : : "a"((u32)(u64)s), "Nd"((u16)PORT_STRING) : "memory");
}

static void put_hex(u64 v)
{
	char b[19];
	int i = 18;
	b[i--] = 0;
	do {
		b[i--] = "0123456789abcdef"[v & 15];
		v >>= 4;
	} while (v && i >= 2);
	b[i--] = 'x';
	b[i] = '0';
	puts_(&b[i]);
}

static void put_dec(u64 v)
{
	char b[21];
	int i = 20;
	b[i] = 0;
	do {
		b[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	puts_(&b[i]);
}

static void result(int ok, const char *check)
{
	if (ok)
		n_pass++;
	else
		n_fail++;
	puts_(ok ? "PASS " : "FAIL ");
	puts_(check);
}

static void end_line(void) { out("\n", 1); }

static void __attribute__((noreturn)) finish(void)
{
	puts_("DONE pass=");
	put_dec(n_pass);
	puts_(" fail=");
	put_dec(n_fail);
	end_line();
	for (;;) {
		outb(PORT_EXIT, n_fail ? 1 : 0);
		__asm__ volatile("cli; hlt");
	}
}

/* ---- interrupts: legacy PIC, IDT ------------------------------------------------------- */

__attribute__((interrupt)) static void on_exception(struct interrupt_frame *f)
{
	(void)f;
	result(0, "cpu-exception unexpected CPU exception");
	end_line();
	finish();
}

__attribute__((interrupt)) static void on_spurious(struct interrupt_frame *f)
{
	(void)f;
	outb(0xA0, 0x20);
	outb(0x20, 0x20);
}

__attribute__((interrupt)) static void on_virtio(struct interrupt_frame *f)
{
	(void)f;
	u32 isr = rd(R_INTERRUPT_STATUS);
	wr(R_INTERRUPT_ACK, isr);
	irq_count++;
	outb(0x20, 0x20); /* EOI */
}

static void set_gate(int v, void (*h)(struct interrupt_frame *))
{
	u64 a = (u64)h;
	idt[v] = (struct idt_entry){ (u16)a, 0x08, 0, 0x8E, (u16)(a >> 16), (u32)(a >> 32), 0 };
}

static void setup_interrupts(u32 irq)
{
	struct { u16 limit; u64 base; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (u64)idt };
	int v;

	for (v = 0; v < 0x20; v++)
		set_gate(v, on_exception);
	for (v = 0x20; v < 0x30; v++)
		set_gate(v, on_spurious);
	set_gate(0x20 + (int)irq, on_virtio);
	__asm__ volatile("lidt %0" : : "m"(idtr));
	/* remap the PIC to vectors 0x20/0x28, edge-triggered, and unmask only our line */
	outb(0x20, 0x11); outb(0xA0, 0x11);
	outb(0x21, 0x20); outb(0xA1, 0x28);
	outb(0x21, 0x04); outb(0xA1, 0x02);
	outb(0x21, 0x01); outb(0xA1, 0x01);
	outb(0x21, (u8)~(1u << irq)); outb(0xA1, 0xff);
}

/* ---- virtio-blk requests ------------------------------------------------------------- */

/*
 * One request: header, `len` data bytes (split into two descriptors when `split`), status.
 * Kicks through QueueNotify and sleeps in hlt until the used ring advances.
 */
static int request(u32 type, u64 sector, void *buf, u32 len, int split)
{
	int n = 0, i;

	hdr.type = type;
	hdr.reserved = 0;
	hdr.sector = sector;
	status_byte = 0xff;
	u16 dflag = (type == T_OUT) ? 0 : D_WRITE;
	ring_desc[n++] = (struct desc){ (u64)&hdr, sizeof(hdr), D_NEXT, 0 };
	if (len && split) {
		ring_desc[n++] = (struct desc){ (u64)buf, len / 2, D_NEXT | dflag, 0 };
		ring_desc[n++] = (struct desc){ (u64)buf + len / 2, len - len / 2, D_NEXT | dflag, 0 };
	} else if (len) {
		ring_desc[n++] = (struct desc){ (u64)buf, len, D_NEXT | dflag, 0 };
	}
	ring_desc[n++] = (struct desc){ (u64)&status_byte, 1, D_WRITE, 0 };
	for (i = 0; i < n - 1; i++)
		ring_desc[i].next = (u16)(i + 1);
	ring_avail.ring[ring_avail.idx % QSZ] = 0;
	barrier();
	ring_avail.idx++;
	barrier();
	/*
	 * Wait for the used ring to advance AND for an interrupt raised after this kick: every
	 * completion is then observed through the interrupt path (a broken irqfd/PIC path hangs the
	 * guest here and the VMM's timeout reports it). The device signals once per completion (no
	 * EVENT_IDX, avail flags 0), and each wait consumes the interrupt, so none can merge.
	 */
	u32 irqs_before = irq_count;
	wr(R_QUEUE_NOTIFY, 0);
	__asm__ volatile("cli");
	while (ring_used.idx == last_used || irq_count == irqs_before) {
		hlt_waits++;
		__asm__ volatile("sti; hlt; cli" ::: "memory");
	}
	last_used++;
	return status_byte;
}

static void fill(u8 *p, u32 len, u8 v)
{
	u64 w = 0x0101010101010101ull * v;
	for (u32 i = 0; i < len; i += 8)
		*(u64 *)(p + i) = w;
}

static int all(const u8 *p, u32 len, u8 v)
{
	u64 w = 0x0101010101010101ull * v;
	for (u32 i = 0; i < len; i += 8)
		if (*(const u64 *)(p + i) != w)
			return 0;
	return 1;
}

/* FNV-1a over 64-bit little-endian words (the VMM recomputes it from the disk). */
static u64 hash(const u8 *p, u32 len)
{
	u64 h = 0xcbf29ce484222325ull;
	for (u32 i = 0; i < len; i += 8) {
		h ^= *(const u64 *)(p + i);
		h *= 0x100000001b3ull;
	}
	return h;
}

static void check_status(int st, int want, const char *check)
{
	result(st == want, check);
	puts_(" status=");
	put_dec((u64)st);
	end_line();
}

/* ---- the program ------------------------------------------------------------------------ */

static int init_device(void)
{
	u32 f0, f1, want0;
	int ok = rd(R_MAGIC) == 0x74726976 && rd(R_VERSION) == 2 && rd(R_DEVICE_ID) == 2;

	result(ok, "probe magic=virt version=2 device=block");
	end_line();
	if (!ok)
		return -1;
	wr(R_STATUS, 0);
	while (rd(R_STATUS) != 0)
		;
	wr(R_STATUS, ST_ACK);
	wr(R_STATUS, ST_ACK | ST_DRIVER);
	wr(R_DEVICE_FEATURES_SEL, 0);
	f0 = rd(R_DEVICE_FEATURES);
	wr(R_DEVICE_FEATURES_SEL, 1);
	f1 = rd(R_DEVICE_FEATURES);
	want0 = f0 & (F_RO | F_FLUSH);
	wr(R_DRIVER_FEATURES_SEL, 0);
	wr(R_DRIVER_FEATURES, want0);
	wr(R_DRIVER_FEATURES_SEL, 1);
	wr(R_DRIVER_FEATURES, F_VERSION_1_HI);
	wr(R_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK);
	ok = (f1 & F_VERSION_1_HI) && (rd(R_STATUS) & ST_FEATURES_OK);
	result(ok, "features version_1=1 ro=");
	put_dec((want0 & F_RO) ? 1 : 0);
	puts_(" flush=");
	put_dec((want0 & F_FLUSH) ? 1 : 0);
	end_line();
	if (!ok)
		return -1;

	/* a 64-bit field read as two 32-bit halves: retry if the generation moved (spec 4.2.2.2) */
	u32 gen;
	do {
		gen = rd(R_CONFIG_GENERATION);
		capacity = rd(R_CONFIG) | ((u64)rd(R_CONFIG + 4) << 32);
	} while (gen != rd(R_CONFIG_GENERATION));
	puts_("INFO capacity ");
	put_dec(capacity);
	end_line();

	wr(R_QUEUE_SEL, 0);
	ok = rd(R_QUEUE_NUM_MAX) >= QSZ && rd(R_QUEUE_READY) == 0;
	wr(R_QUEUE_NUM, QSZ);
	wr(R_QUEUE_DESC_LOW, (u32)(u64)ring_desc);
	wr(R_QUEUE_DESC_HIGH, (u32)((u64)ring_desc >> 32));
	wr(R_QUEUE_DRIVER_LOW, (u32)(u64)&ring_avail);
	wr(R_QUEUE_DRIVER_HIGH, (u32)((u64)&ring_avail >> 32));
	wr(R_QUEUE_DEVICE_LOW, (u32)(u64)&ring_used);
	wr(R_QUEUE_DEVICE_HIGH, (u32)((u64)&ring_used >> 32));
	wr(R_QUEUE_READY, 1);
	ok = ok && rd(R_QUEUE_READY) == 1;
	wr(R_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
	ok = ok && (rd(R_STATUS) & ST_DRIVER_OK) && capacity >= 8;
	result(ok, "queue size=8 ready=1 driver_ok=1");
	end_line();
	return ok ? (int)(want0 & (F_RO | F_FLUSH)) : -1;
}

static void read_write_checks(int flush)
{
	u64 last = capacity - 1;

	fill(data, 512, 0xA1);
	fill(data + 512, 512, 0xA2);
	check_status(request(T_OUT, 1, data, 1024, 1), S_OK, "write sectors=1-2 pattern=a1,a2 descriptors=2");
	fill(data, 512, 0x5A);
	check_status(request(T_OUT, last, data, 512, 0), S_OK, "write last-sector pattern=5a");
	if (flush)
		check_status(request(T_FLUSH, 0, 0, 0, 0), S_OK, "flush");
	fill(data, 1024, 0);
	int st = request(T_IN, 1, data, 1024, 1);
	result(st == S_OK && all(data, 512, 0xA1) && all(data + 512, 512, 0xA2), "read-back sectors=1-2");
	puts_(" status=");
	put_dec((u64)st);
	end_line();
	fill(data, 512, 0);
	st = request(T_IN, last, data, 512, 0);
	result(st == S_OK && all(data, 512, 0x5A), "read-back last-sector");
	puts_(" status=");
	put_dec((u64)st);
	end_line();
	check_status(request(T_OUT, last, data, 1024, 0), S_IOERR, "write-past-end sectors=last..last+1");
}

static void read_only_checks(void)
{
	fill(data, 512, 0xEE);
	check_status(request(T_OUT, 1, data, 512, 0), S_IOERR, "write-rejected-readonly sector=1");
}

void __attribute__((section(".text.start"), noreturn)) _start(u64 mmio_base, u64 irq)
{
	int features;

	mmio = (volatile u8 *)mmio_base;
	puts_("INFO guest vblk-kvm-guest 1\n");
	setup_interrupts((u32)irq & 7);
	features = init_device();
	if (features < 0)
		finish();
	if (features & F_RO)
		read_only_checks();
	else
		read_write_checks(features & F_FLUSH);

	/* whatever the mode: read sectors 0-1 and let the VMM compare with the disk */
	int st = request(T_IN, 0, data, 1024, 0);
	check_status(st, S_OK, "read sectors=0-1");
	puts_("INFO hash sector=0 count=2 fnv=");
	put_hex(hash(data, 1024));
	end_line();

	for (int i = 0; i < 20; i++)
		idbuf[i] = 0;
	st = request(T_GET_ID, 0, idbuf, 20, 0);
	char id[21];
	int n = 0;
	for (int i = 0; i < 20 && idbuf[i]; i++)
		id[n++] = (idbuf[i] >= 0x21 && idbuf[i] < 0x7f) ? (char)idbuf[i] : '?';
	id[n] = 0;
	result(st == S_OK, "get-id id=");
	puts_(id);
	puts_(" status=");
	put_dec((u64)st);
	end_line();

	check_status(request(T_IN, capacity, data, 512, 0), S_IOERR, "read-past-end sector=capacity");
	check_status(request(99, 0, data, 512, 0), S_UNSUPP, "unknown-type type=99");

	/* one interrupt per request, each taken while the guest slept in hlt (see request()) */
	u32 reqs = last_used;
	result(irq_count >= reqs && hlt_waits >= 1, "interrupts irqs=");
	put_dec(irq_count);
	puts_(" hlt-waits=");
	put_dec(hlt_waits);
	puts_(" requests=");
	put_dec(reqs);
	end_line();

	/* driver shutdown: reset, and the device must read back 0 (the VMM finishes it first) */
	wr(R_STATUS, 0);
	u32 st0 = rd(R_STATUS);
	wr(R_QUEUE_SEL, 0);
	result(st0 == 0 && rd(R_QUEUE_READY) == 0, "reset status=");
	put_dec(st0);
	end_line();
	finish();
}
