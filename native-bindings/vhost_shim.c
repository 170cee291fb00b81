/*
 * vblk native shim, vhost-user part: what Node's net module cannot do.
 *
 * - a Unix listening socket whose connections we own as raw fds, and recvmsg with SCM_RIGHTS
 *   (vhost-user passes memory-region memfds, kick/call eventfds in ancillary data; Node's
 *   net.Socket silently drops them);
 * - a readiness poller: one native thread per server running epoll over the listening socket,
 *   the connection socket and every kick eventfd. For an eventfd it drains the 8-byte counter
 *   itself; for a socket it only reports readiness (EPOLLONESHOT, re-armed by the caller after it
 *   has read everything). Each event becomes a 4-byte token written to a pipe that Node reads
 *   with an ordinary net.Socket, so the event loop never blocks, no libuv thread-pool thread is
 *   tied up per queue, and a guest kick costs no FFI call on the JavaScript side.
 *
 * Every function returns its result or -errno (the convention of native/library.ts).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define VU_MAX_FDS 16
#define POLLERS 16
#define POLL_SLOTS 1024

/* ---- sockets ------------------------------------------------------------------------------- */

int64_t vblk_vu_listen(const char *path, int32_t backlog)
{
	struct sockaddr_un sa;
	size_t n = strlen(path);
	if (n >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -(int64_t)errno;
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	memcpy(sa.sun_path, path, n);
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, backlog) < 0) {
		int e = errno;
		close(fd);
		return -(int64_t)e;
	}
	return fd;
}

/* Non-blocking accept: the connection fd, or -EAGAIN when nobody is waiting. */
int64_t vblk_vu_accept(int32_t lfd)
{
	int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
	return fd < 0 ? -(int64_t)errno : fd;
}

/* A client connection (for tests that play the front-end). */
int64_t vblk_vu_connect(const char *path)
{
	struct sockaddr_un sa;
	size_t n = strlen(path);
	if (n >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -(int64_t)errno;
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	memcpy(sa.sun_path, path, n);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int e = errno;
		close(fd);
		return -(int64_t)e;
	}
	return fd;
}

/*
 * Non-blocking recvmsg of at most `len` bytes. Received descriptors are stored in `fds` (int32
 * each, at most `maxfds`, capped at VU_MAX_FDS) and their count in `*nfds`. Returns the byte count
 * (0 at end of stream) or -errno (-EAGAIN: nothing to read). If the ancillary data was truncated
 * every received fd is closed and -EMSGSIZE is returned: the message cannot be trusted.
 */
int64_t vblk_vu_recv(int32_t fd, uint8_t *buf, uint64_t len, int32_t *fds, int32_t maxfds, int32_t *nfds)
{
	union {
		char buf[CMSG_SPACE(VU_MAX_FDS * sizeof(int))];
		struct cmsghdr align;
	} ctl;
	struct iovec iov = { .iov_base = buf, .iov_len = (size_t)len };
	struct msghdr msg;
	memset(&msg, 0, sizeof(msg));
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = ctl.buf;
	msg.msg_controllen = sizeof(ctl.buf);
	*nfds = 0;
	ssize_t r;
	do {
		r = recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
	} while (r < 0 && errno == EINTR);
	if (r < 0)
		return -(int64_t)errno;
	int count = 0, overflow = 0;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		int *p = (int *)CMSG_DATA(c);
		for (size_t i = 0; i < k; i++) {
			int v;
			memcpy(&v, p + i, sizeof(int));
			if (count < maxfds && count < VU_MAX_FDS)
				fds[count++] = v;
			else {
				close(v);
				overflow = 1;
			}
		}
	}
	if (overflow || (msg.msg_flags & MSG_CTRUNC)) {
		for (int i = 0; i < count; i++)
			close(fds[i]);
		return -EMSGSIZE;
	}
	*nfds = count;
	return r;
}

/*
 * Sends as much of `buf` as the socket takes without waiting (descriptors ride on the first byte),
 * MSG_NOSIGNAL. Returns the bytes sent (all of them on a blocking socket), -EAGAIN when none.
 */
int64_t vblk_vu_send(int32_t fd, const uint8_t *buf, uint64_t len, const int32_t *fds, int32_t nfds)
{
	size_t done = 0;
	int first = 1;
	while (done < len) {
		union {
			char buf[CMSG_SPACE(VU_MAX_FDS * sizeof(int))];
			struct cmsghdr align;
		} ctl;
		struct iovec iov = { .iov_base = (void *)(buf + done), .iov_len = (size_t)len - done };
		struct msghdr msg;
		memset(&msg, 0, sizeof(msg));
		msg.msg_iov = &iov;
		msg.msg_iovlen = 1;
		if (first && nfds > 0) {
			if (nfds > VU_MAX_FDS)
				return -EINVAL;
			memset(&ctl, 0, sizeof(ctl));
			msg.msg_control = ctl.buf;
			msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
			struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
			c->cmsg_level = SOL_SOCKET;
			c->cmsg_type = SCM_RIGHTS;
			c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
			memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
		}
		ssize_t r = sendmsg(fd, &msg, MSG_NOSIGNAL);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			/*
			 * Never wait for the peer: a full socket buffer returns what went out so far (the
			 * caller queues the rest and writes it when the socket is writable), -EAGAIN when
			 * nothing did. A front-end that stops reading must not stall the process.
			 */
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return done > 0 ? (int64_t)done : -EAGAIN;
			return -(int64_t)errno;
		}
		done += (size_t)r;
		first = 0;
	}
	return (int64_t)done;
}

/* ---- poller ------------------------------------------------------------------------------- */

struct slot {
	int fd;
	uint32_t token;
	int mode; /* 0 free, 1 eventfd (drained here), 2 notify once (EPOLLONESHOT) */
};

struct poller {
	int used;
	int epfd;
	int stopfd;
	int pipe_r, pipe_w;
	pthread_t thread;
	pthread_mutex_t lock;
	struct slot slots[POLL_SLOTS];
};

static struct poller pollers[POLLERS];
static pthread_mutex_t pollers_lock = PTHREAD_MUTEX_INITIALIZER;

static void write_all(int fd, const void *p, size_t n)
{
	const char *c = p;
	while (n > 0) {
		ssize_t r = write(fd, c, n);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return; /* reader gone (EPIPE): the poller is being destroyed */
		}
		c += r;
		n -= (size_t)r;
	}
}

static void *poller_main(void *arg)
{
	struct poller *p = arg;
	struct epoll_event ev[64];
	uint32_t tokens[64];
	for (;;) {
		int n = epoll_wait(p->epfd, ev, 64, -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		int k = 0, stop = 0;
		pthread_mutex_lock(&p->lock);
		for (int i = 0; i < n; i++) {
			uint64_t d = ev[i].data.u64;
			if (d == UINT64_MAX) {
				stop = 1;
				continue;
			}
			int fd = (int)(uint32_t)d;
			uint32_t token = (uint32_t)(d >> 32);
			struct slot *s = NULL;
			for (int j = 0; j < POLL_SLOTS; j++) {
				if (p->slots[j].mode != 0 && p->slots[j].fd == fd && p->slots[j].token == token) {
					s = &p->slots[j];
					break;
				}
			}
			if (s == NULL)
				continue; /* removed while we were waiting */
			if (s->mode == 1) {
				uint64_t v;
				ssize_t r = read(fd, &v, sizeof(v));
				if (r < 0 && errno == EAGAIN)
					continue;
			}
			tokens[k++] = token;
		}
		pthread_mutex_unlock(&p->lock);
		if (k > 0)
			write_all(p->pipe_w, tokens, (size_t)k * sizeof(uint32_t));
		if (stop)
			break;
	}
	return NULL;
}

/* Creates a poller and starts its thread. Returns its id; `vblk_poller_pipe` gives the read end. */
int64_t vblk_poller_create(void)
{
	pthread_mutex_lock(&pollers_lock);
	int id = -1;
	for (int i = 0; i < POLLERS; i++) {
		if (!pollers[i].used) {
			id = i;
			break;
		}
	}
	if (id < 0) {
		pthread_mutex_unlock(&pollers_lock);
		return -EMFILE;
	}
	struct poller *p = &pollers[id];
	memset(p, 0, sizeof(*p));
	int pfd[2];
	p->epfd = epoll_create1(EPOLL_CLOEXEC);
	p->stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (p->epfd < 0 || p->stopfd < 0 || pipe2(pfd, O_CLOEXEC) < 0) {
		int e = errno;
		if (p->epfd >= 0)
			close(p->epfd);
		if (p->stopfd >= 0)
			close(p->stopfd);
		pthread_mutex_unlock(&pollers_lock);
		return -(int64_t)e;
	}
	p->pipe_r = pfd[0];
	p->pipe_w = pfd[1];
	pthread_mutex_init(&p->lock, NULL);
	struct epoll_event ev = { .events = EPOLLIN, .data.u64 = UINT64_MAX };
	epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->stopfd, &ev);
	int e = pthread_create(&p->thread, NULL, poller_main, p);
	if (e != 0) {
		close(p->epfd);
		close(p->stopfd);
		close(pfd[0]);
		close(pfd[1]);
		pthread_mutex_unlock(&pollers_lock);
		return -(int64_t)e;
	}
	p->used = 1;
	pthread_mutex_unlock(&pollers_lock);
	return id;
}

static struct poller *get_poller(int32_t id)
{
	if (id < 0 || id >= POLLERS || !pollers[id].used)
		return NULL;
	return &pollers[id];
}

int64_t vblk_poller_pipe(int32_t id)
{
	struct poller *p = get_poller(id);
	return p ? p->pipe_r : -EBADF;
}

/*
 * Watches `fd`: mode 1 = an eventfd whose counter the poller drains (one token per wake-up),
 * mode 2 = a socket reported once (EPOLLONESHOT) until `vblk_poller_rearm`.
 */
int64_t vblk_poller_add(int32_t id, int32_t fd, uint32_t token, int32_t mode)
{
	struct poller *p = get_poller(id);
	if (p == NULL)
		return -EBADF;
	if (mode != 1 && mode != 2)
		return -EINVAL;
	if (mode == 1) {
		int fl = fcntl(fd, F_GETFL);
		if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
			return -(int64_t)errno;
	}
	pthread_mutex_lock(&p->lock);
	struct slot *s = NULL;
	for (int j = 0; j < POLL_SLOTS; j++) {
		if (p->slots[j].mode == 0) {
			s = &p->slots[j];
			break;
		}
	}
	if (s == NULL) {
		pthread_mutex_unlock(&p->lock);
		return -ENOSPC;
	}
	struct epoll_event ev = { .events = EPOLLIN | (mode == 2 ? EPOLLONESHOT : 0),
				  .data.u64 = ((uint64_t)token << 32) | (uint32_t)fd };
	if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
		int e = errno;
		pthread_mutex_unlock(&p->lock);
		return -(int64_t)e;
	}
	s->fd = fd;
	s->token = token;
	s->mode = mode;
	pthread_mutex_unlock(&p->lock);
	return 0;
}

/*
 * Re-enables a mode-2 registration for one more report: `interest` bit 0 = readable, bit 1 =
 * writable (a socket with replies queued), both = whichever comes first.
 */
int64_t vblk_poller_rearm(int32_t id, int32_t fd, uint32_t token, int32_t interest)
{
	struct poller *p = get_poller(id);
	if (p == NULL)
		return -EBADF;
	if (interest < 1 || interest > 3)
		return -EINVAL;
	uint32_t events = EPOLLONESHOT | ((interest & 1) ? EPOLLIN : 0) | ((interest & 2) ? EPOLLOUT : 0);
	struct epoll_event ev = { .events = events, .data.u64 = ((uint64_t)token << 32) | (uint32_t)fd };
	return epoll_ctl(p->epfd, EPOLL_CTL_MOD, fd, &ev) < 0 ? -(int64_t)errno : 0;
}

/* Stops watching `fd`. After it returns the poller thread no longer touches `fd`: close it freely. */
int64_t vblk_poller_del(int32_t id, int32_t fd)
{
	struct poller *p = get_poller(id);
	if (p == NULL)
		return -EBADF;
	pthread_mutex_lock(&p->lock);
	int found = 0;
	for (int j = 0; j < POLL_SLOTS; j++) {
		if (p->slots[j].mode != 0 && p->slots[j].fd == fd) {
			p->slots[j].mode = 0;
			found = 1;
		}
	}
	int r = epoll_ctl(p->epfd, EPOLL_CTL_DEL, fd, NULL);
	int e = errno;
	pthread_mutex_unlock(&p->lock);
	if (!found)
		return -ENOENT;
	return r < 0 && e != EBADF && e != ENOENT ? -(int64_t)e : 0;
}

/*
 * Stops the thread and releases the poller. The pipe's write end is closed here; the read end
 * belongs to the caller (Node wraps it in a net.Socket, which closes it) and sees end-of-file.
 */
int64_t vblk_poller_destroy(int32_t id)
{
	struct poller *p = get_poller(id);
	if (p == NULL)
		return -EBADF;
	uint64_t one = 1;
	write_all(p->stopfd, &one, sizeof(one));
	pthread_join(p->thread, NULL);
	close(p->epfd);
	close(p->stopfd);
	close(p->pipe_w);
	pthread_mutex_destroy(&p->lock);
	pthread_mutex_lock(&pollers_lock);
	p->used = 0;
	pthread_mutex_unlock(&pollers_lock);
	return 0;
}
