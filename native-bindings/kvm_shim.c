/*
 * vblk native shim: the few things ffi-rs cannot express well.
 *
 * - every syscall wrapper returns the result or -errno (so errno never has to cross the FFI
 *   boundary, where another call on the same thread could clobber it);
 * - ioctl is variadic in libc, so it gets a fixed-signature wrapper;
 * - an address (from mmap) is turned into a pointer that ffi-rs can wrap as a zero-copy Buffer;
 * - KVM_RUN on a worker thread, plus a "kick" that interrupts it with a signal (as kvmtool's
 *   SIGKVMEXIT does), so the VMM can stop a vCPU that is halted or spinning in the guest.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/kvm.h>

#define VBLK_KICK_SLOTS 64

int64_t vblk_open(const char *path, int32_t flags, int32_t mode)
{
	int fd = open(path, flags | O_CLOEXEC, (mode_t)mode);
	return fd < 0 ? -(int64_t)errno : fd;
}

int64_t vblk_close(int32_t fd)
{
	return close(fd) < 0 ? -(int64_t)errno : 0;
}

/* lseek(2), for SEEK_DATA / SEEK_HOLE (Node's fs has neither): the new offset or -errno
   (-ENXIO: no data at or after `offset`). */
int64_t vblk_lseek(int32_t fd, int64_t offset, int32_t whence)
{
	off_t r = lseek(fd, (off_t)offset, whence);
	return r < 0 ? -(int64_t)errno : (int64_t)r;
}

int64_t vblk_ioctl(int32_t fd, uint64_t request, uint64_t arg)
{
	int r = ioctl(fd, (unsigned long)request, (unsigned long)arg);
	return r < 0 ? -(int64_t)errno : r;
}

/* ioctl with a pointer argument (a struct the kernel reads and/or writes in place). */
int64_t vblk_ioctl_buf(int32_t fd, uint64_t request, void *arg)
{
	int r = ioctl(fd, (unsigned long)request, arg);
	return r < 0 ? -(int64_t)errno : r;
}

int64_t vblk_mmap(uint64_t addr, uint64_t len, int32_t prot, int32_t flags, int32_t fd, int64_t off)
{
	void *p = mmap((void *)(uintptr_t)addr, (size_t)len, prot, flags, fd, (off_t)off);
	return p == MAP_FAILED ? -(int64_t)errno : (int64_t)(uintptr_t)p;
}

int64_t vblk_munmap(uint64_t addr, uint64_t len)
{
	return munmap((void *)(uintptr_t)addr, (size_t)len) < 0 ? -(int64_t)errno : 0;
}

/*
 * The seals of a memfd (F_GET_SEALS), or -errno (EINVAL: the file does not support sealing).
 * vhost-user guest memory must not shrink under a mapping: that would turn guest accesses into
 * SIGBUS in this process.
 */
int64_t vblk_get_seals(int32_t fd)
{
	int r = fcntl(fd, F_GET_SEALS);
	return r < 0 ? -(int64_t)errno : r;
}

/* memfd_create(2) with MFD_CLOEXEC added (tests play a front-end's guest RAM with it). */
int64_t vblk_memfd_create(const char *name, uint32_t flags)
{
	int fd = memfd_create(name, flags | MFD_CLOEXEC);
	return fd < 0 ? -(int64_t)errno : fd;
}

/* fcntl(F_ADD_SEALS). */
int64_t vblk_add_seals(int32_t fd, int32_t seals)
{
	return fcntl(fd, F_ADD_SEALS, seals) < 0 ? -(int64_t)errno : 0;
}

int64_t vblk_eventfd(uint32_t initval, int32_t flags)
{
	int fd = eventfd(initval, flags | EFD_CLOEXEC);
	return fd < 0 ? -(int64_t)errno : fd;
}

/* An address as a pointer, for ffi-rs createExternalBuffer. */
void *vblk_ptr(uint64_t addr)
{
	return (void *)(uintptr_t)addr;
}

/* ---- KVM_RUN with a kick ---------------------------------------------------------------- */

static pthread_mutex_t kick_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_t kick_thread[VBLK_KICK_SLOTS];
static int kick_active[VBLK_KICK_SLOTS];
static int kick_installed;

static void kick_handler(int sig)
{
	(void)sig; /* only there so that the signal interrupts KVM_RUN with EINTR */
}

static int kick_signal(void)
{
	return SIGRTMIN + 7;
}

/* Installs the (no-op) kick signal handler once; SA_RESTART keeps other syscalls unaffected. */
int64_t vblk_kick_init(void)
{
	struct sigaction sa;

	pthread_mutex_lock(&kick_lock);
	if (!kick_installed) {
		memset(&sa, 0, sizeof(sa));
		sa.sa_handler = kick_handler;
		sa.sa_flags = SA_RESTART;
		sigemptyset(&sa.sa_mask);
		if (sigaction(kick_signal(), &sa, NULL) < 0) {
			int e = errno;
			pthread_mutex_unlock(&kick_lock);
			return -(int64_t)e;
		}
		kick_installed = 1;
	}
	pthread_mutex_unlock(&kick_lock);
	return 0;
}

/*
 * ioctl(vcpu_fd, KVM_RUN) on the calling (worker) thread. While it runs, `slot` names the thread
 * so that vblk_kvm_kick(slot) can interrupt it. Returns 0 or -errno (-EINTR after a kick).
 */
int64_t vblk_kvm_run(int32_t vcpu_fd, int32_t slot)
{
	sigset_t set;
	int r, e;

	if (slot < 0 || slot >= VBLK_KICK_SLOTS)
		return -EINVAL;
	sigemptyset(&set);
	sigaddset(&set, kick_signal());
	pthread_sigmask(SIG_UNBLOCK, &set, NULL);

	pthread_mutex_lock(&kick_lock);
	kick_thread[slot] = pthread_self();
	kick_active[slot] = 1;
	pthread_mutex_unlock(&kick_lock);

	r = ioctl(vcpu_fd, KVM_RUN, 0);
	e = errno;

	pthread_mutex_lock(&kick_lock);
	kick_active[slot] = 0;
	pthread_mutex_unlock(&kick_lock);
	return r < 0 ? -(int64_t)e : r;
}

/* Interrupts the KVM_RUN in progress on `slot`, if any. Returns 1 if a thread was signalled. */
int64_t vblk_kvm_kick(int32_t slot)
{
	int sent = 0;

	if (slot < 0 || slot >= VBLK_KICK_SLOTS)
		return -EINVAL;
	pthread_mutex_lock(&kick_lock);
	if (kick_active[slot] && pthread_kill(kick_thread[slot], kick_signal()) == 0)
		sent = 1;
	pthread_mutex_unlock(&kick_lock);
	return sent;
}
