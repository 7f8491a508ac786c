/*
 * uffd_baseline: the plain C userfaultfd handler that pagewarden is measured against, plus the
 * kernel bounds of the bulk operations. `pagewarden bench` compiles it with gcc at run time into
 * a temporary directory and runs it once per repetition, interleaved with pagewarden and the
 * pure-Python handler, so every figure comes from the same machine state.
 *
 * Modes (each prints exactly one JSON object on stdout):
 *
 *   fault KIND PAGES THREADS [HANDLER_CPU TOUCHER_CPU [batched]]
 *       KIND is copy | zero | poison | continue | hugetlb. One handler thread does what the
 *       userfaultfd(2) man page does: poll, read one message, one resolving ioctl per fault
 *       (UFFDIO_COPY / ZEROPAGE / POISON; for continue a pwrite into the shmem page cache and
 *       UFFDIO_CONTINUE; for hugetlb UFFDIO_COPY of a whole 2 MiB page). THREADS toucher threads
 *       each read one word of every THREADS-th page (round robin, as pagewarden's toucher does),
 *       timing every touch with CLOCK_MONOTONIC. A SIGBUS (poison) resumes after the load.
 *       Reports the per-touch latencies, the wall time and the handler thread's
 *       CLOCK_THREAD_CPUTIME_ID. With HANDLER_CPU / TOUCHER_CPU (>= 0) the handler thread and
 *       every toucher thread are pinned to those CPUs (-1 leaves them to the scheduler).
 *       "batched" is not the plain baseline but an experiment: read up to 64 messages per
 *       wake and resolve each run of contiguous faulting pages with one ranged ioctl (one wake
 *       for the run), to show how far batching the read side and waking in ranges goes.
 *
 *   copybw BYTES CHUNK
 *       The UFFDIO_COPY bandwidth bound: a registered anonymous range is filled with ranged
 *       UFFDIO_COPY calls of CHUNK bytes from a pre-faulted source, with no faults at all.
 *
 *   memcpy BYTES
 *       memcpy of the same bytes into a fresh anonymous mapping (so including first-touch
 *       faults), then again into the now-populated mapping.
 *
 *   prepoison PAGES STRIDE RUN
 *       Installs PAGES poison markers on a registered anonymous range: runs of RUN pages every
 *       STRIDE pages, one ranged UFFDIO_POISON per run (the kernel bound of pre-poisoning).
 *
 * /usr/include/linux/userfaultfd.h on the development machines is Linux 6.1 and lacks
 * UFFDIO_POISON, so this file defines what it needs itself (numbers from KERNEL-NOTES.md).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

/* ---- userfaultfd ABI this file needs beyond a 6.1 header ---------------------------------- */
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1ULL << 14)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef UFFDIO_POISON
struct uffdio_poison {
	struct uffdio_range range;
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1 << 0)
	__u64 mode;
	__s64 updated;
};
#define UFFDIO_POISON 0xC020AA08UL
#endif
_Static_assert(sizeof(struct uffd_msg) == 32, "uffd_msg is 32 bytes");
_Static_assert(sizeof(struct uffdio_poison) == 32, "uffdio_poison is 32 bytes");
_Static_assert(sizeof(struct uffdio_copy) == 40, "uffdio_copy is 40 bytes");
_Static_assert(UFFDIO_COPY == 0xC028AA03UL, "UFFDIO_COPY request number");
_Static_assert(UFFDIO_CONTINUE == 0xC020AA07UL, "UFFDIO_CONTINUE request number");
#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif

#define PAGE_4K 4096UL
#define PAGE_2M (2UL << 20)

enum kind { K_COPY, K_ZERO, K_POISON, K_CONTINUE, K_HUGETLB };

static void die(const char *what)
{
	fprintf(stderr, "uffd_baseline: %s: %s\n", what, strerror(errno));
	exit(2);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t thread_cpu_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int open_uffd(uint64_t features)
{
	int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0)
		die("userfaultfd (needs root or vm.unprivileged_userfaultfd=1)");
	struct uffdio_api api = { .api = UFFD_API, .features = features };
	if (ioctl(fd, UFFDIO_API, &api))
		die("UFFDIO_API");
	return fd;
}

static void register_range(int uffd, void *addr, size_t len, uint64_t mode)
{
	struct uffdio_register reg = {
		.range = { .start = (uint64_t)(uintptr_t)addr, .len = len },
		.mode = mode,
	};
	if (ioctl(uffd, UFFDIO_REGISTER, &reg))
		die("UFFDIO_REGISTER");
}

static char *map_anon(size_t len)
{
	char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED)
		die("mmap");
	madvise(p, len, MADV_NOHUGEPAGE);
	return p;
}

static char *pattern_buffer(size_t len)
{
	char *p = map_anon(len);
	for (size_t i = 0; i < len; i += 8)
		*(uint64_t *)(p + i) = (uint64_t)i * 0x9e3779b97f4a7c15ULL;
	return p;
}

/* ---- fault mode ---------------------------------------------------------------------------- */

static struct {
	enum kind kind;
	int uffd;
	int stopfd;
	int memfd;
	char *base;
	char *src;
	size_t page_size;
	size_t pages;
	unsigned threads;
	uint64_t handler_cpu_ns;
	uint64_t faults;
	uint64_t *lat_ns;
	int batched;
	int handler_cpu;
	int toucher_cpu;
} g;

/* Pins the calling thread to `cpu` (no-op for a negative cpu). */
static void pin_self(int cpu)
{
	if (cpu < 0)
		return;
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof set, &set))
		die("sched_setaffinity");
}

/*
 * A SIGBUS on the toucher's load resumes after it the way pagewarden's probe does (and so at the
 * same cost): the handler moves the saved instruction pointer from the load to a fixup label and
 * returns through rt_sigreturn.
 */
extern const char baseline_load[], baseline_fixup[];

static void on_sigbus(int sig, siginfo_t *info, void *ctx)
{
	(void)sig;
	(void)info;
	ucontext_t *uc = ctx;
	if (uc->uc_mcontext.gregs[REG_RIP] == (greg_t)(uintptr_t)baseline_load) {
		uc->uc_mcontext.gregs[REG_RIP] = (greg_t)(uintptr_t)baseline_fixup;
		return;
	}
	signal(SIGBUS, SIG_DFL); /* not ours: die of it */
}

static void wake(uint64_t page, uint64_t len)
{
	struct uffdio_range r = { .start = page, .len = len };
	ioctl(g.uffd, UFFDIO_WAKE, &r);
}

/* Resolves [page, page + len) with one ioctl that also wakes the faulting threads. */
static void resolve(uint64_t page, uint64_t len)
{
	uint64_t offset = page - (uint64_t)(uintptr_t)g.base;
	int rc;
	for (;;) {
		switch (g.kind) {
		case K_COPY:
		case K_HUGETLB: {
			struct uffdio_copy c = { .dst = page,
						 .src = (uint64_t)(uintptr_t)(g.src + offset),
						 .len = len };
			rc = ioctl(g.uffd, UFFDIO_COPY, &c);
			break;
		}
		case K_ZERO: {
			struct uffdio_zeropage z = { .range = { .start = page, .len = len } };
			rc = ioctl(g.uffd, UFFDIO_ZEROPAGE, &z);
			break;
		}
		case K_POISON: {
			struct uffdio_poison p = { .range = { .start = page, .len = len } };
			rc = ioctl(g.uffd, UFFDIO_POISON, &p);
			break;
		}
		case K_CONTINUE: {
			if (pwrite(g.memfd, g.src + offset, len, (off_t)offset) != (ssize_t)len)
				die("pwrite into the shmem page cache");
			struct uffdio_continue c = { .range = { .start = page, .len = len } };
			rc = ioctl(g.uffd, UFFDIO_CONTINUE, &c);
			break;
		}
		default:
			abort();
		}
		if (rc == 0)
			return;
		if (errno == EEXIST) { /* mapped meanwhile: wake whoever waits on it */
			wake(page, len);
			return;
		}
		if (errno == EAGAIN) /* an event is queued; none are negotiated here */
			continue;
		die("resolving ioctl");
	}
}

static void *handler_thread(void *arg)
{
	(void)arg;
	pin_self(g.handler_cpu);
	uint64_t cpu0 = thread_cpu_ns();
	struct pollfd fds[2] = { { .fd = g.uffd, .events = POLLIN }, { .fd = g.stopfd, .events = POLLIN } };
	for (;;) {
		if (poll(fds, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (fds[1].revents)
			break;
		struct uffd_msg msg;
		ssize_t n = read(g.uffd, &msg, sizeof msg);
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			die("read from the uffd");
		}
		if (n != sizeof msg || msg.event != UFFD_EVENT_PAGEFAULT)
			continue;
		resolve(msg.arg.pagefault.address & ~(uint64_t)(g.page_size - 1), g.page_size);
		g.faults++;
	}
	g.handler_cpu_ns = thread_cpu_ns() - cpu0;
	return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* The batching experiment: up to 64 messages per read, contiguous pages resolved together. */
static void *batched_handler_thread(void *arg)
{
	(void)arg;
	pin_self(g.handler_cpu);
	uint64_t cpu0 = thread_cpu_ns();
	struct pollfd fds[2] = { { .fd = g.uffd, .events = POLLIN }, { .fd = g.stopfd, .events = POLLIN } };
	struct uffd_msg msgs[64];
	uint64_t pages[64];
	for (;;) {
		if (poll(fds, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (fds[1].revents)
			break;
		ssize_t n = read(g.uffd, msgs, sizeof msgs);
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			die("read from the uffd");
		}
		size_t count = 0;
		for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++)
			if (msgs[i].event == UFFD_EVENT_PAGEFAULT)
				pages[count++] = msgs[i].arg.pagefault.address & ~(uint64_t)(g.page_size - 1);
		qsort(pages, count, sizeof pages[0], cmp_u64);
		for (size_t i = 0; i < count;) {
			uint64_t end = pages[i] + g.page_size;
			size_t j = i + 1;
			for (; j < count && pages[j] <= end; j++) /* duplicates fold in */
				if (pages[j] == end)
					end += g.page_size;
			resolve(pages[i], end - pages[i]);
			i = j;
		}
		g.faults += count;
	}
	g.handler_cpu_ns = thread_cpu_ns() - cpu0;
	return NULL;
}

struct part {
	unsigned index;
	uint64_t sigbus;
};

/* One load of a word that may be poisoned: 1 if it raised SIGBUS. */
static __attribute__((noinline, noclone)) int touch_poisonable(volatile uint64_t *word)
{
	int sigbus;
	__asm__ volatile(".globl baseline_load\n"
			 ".globl baseline_fixup\n"
			 "baseline_load: movq (%1), %%rax\n"
			 "xorl %0, %0\n"
			 "jmp 1f\n"
			 "baseline_fixup: movl $1, %0\n"
			 "1:\n"
			 : "=r"(sigbus)
			 : "r"(word)
			 : "rax", "memory");
	return sigbus;
}

static void *toucher_thread(void *arg)
{
	struct part *part = arg;
	pin_self(g.toucher_cpu);
	for (size_t k = part->index; k < g.pages; k += g.threads) {
		volatile uint64_t *word = (volatile uint64_t *)(g.base + k * g.page_size);
		uint64_t t0 = now_ns();
		if (g.kind == K_POISON) {
			part->sigbus += (uint64_t)touch_poisonable(word);
		} else {
			(void)*word;
		}
		g.lat_ns[k] = now_ns() - t0;
	}
	return NULL;
}

static int run_fault(const char *kind_name, size_t pages, unsigned threads, int handler_cpu,
		     int toucher_cpu, int batched)
{
	static const char *names[] = { "copy", "zero", "poison", "continue", "hugetlb" };
	int kind = -1;
	for (int i = 0; i < 5; i++)
		if (!strcmp(kind_name, names[i]))
			kind = i;
	if (kind < 0 || pages == 0 || threads == 0 || threads > 64) {
		fprintf(stderr, "uffd_baseline: bad fault arguments\n");
		return 2;
	}
	g.kind = (enum kind)kind;
	g.handler_cpu = handler_cpu;
	g.batched = batched;
	g.toucher_cpu = toucher_cpu;
	g.pages = pages;
	g.threads = threads;
	g.page_size = g.kind == K_HUGETLB ? PAGE_2M : PAGE_4K;
	size_t size = pages * g.page_size;
	uint64_t features = 0, mode = UFFDIO_REGISTER_MODE_MISSING;
	g.memfd = -1;
	if (g.kind == K_CONTINUE || g.kind == K_HUGETLB) {
		g.memfd = memfd_create("uffd-baseline", MFD_CLOEXEC |
						       (g.kind == K_HUGETLB ? MFD_HUGETLB : 0));
		if (g.memfd < 0)
			die("memfd_create");
		if (ftruncate(g.memfd, (off_t)size))
			die("ftruncate");
		g.base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, g.memfd, 0);
		if (g.base == MAP_FAILED)
			die("mmap of the memfd (hugetlb needs free hugepages)");
		if (g.kind == K_CONTINUE) {
			features = UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM;
			/* As pagewarden registers MINOR mode: a hole must never read as zeros. */
			mode |= UFFDIO_REGISTER_MODE_MINOR;
		} else {
			features = UFFD_FEATURE_MISSING_HUGETLBFS;
		}
	} else {
		g.base = map_anon(size);
		if (g.kind == K_POISON)
			features = UFFD_FEATURE_POISON;
	}
	if (g.kind == K_COPY || g.kind == K_CONTINUE || g.kind == K_HUGETLB)
		g.src = pattern_buffer(size);
	g.lat_ns = calloc(pages, sizeof(uint64_t));
	if (!g.lat_ns)
		die("calloc");
	g.uffd = open_uffd(features);
	register_range(g.uffd, g.base, size, mode);
	g.stopfd = eventfd(0, EFD_CLOEXEC);
	if (g.stopfd < 0)
		die("eventfd");
	if (g.kind == K_POISON) {
		struct sigaction sa;
		memset(&sa, 0, sizeof sa);
		sa.sa_sigaction = on_sigbus;
		sa.sa_flags = SA_SIGINFO;
		sigemptyset(&sa.sa_mask);
		if (sigaction(SIGBUS, &sa, NULL))
			die("sigaction");
	}

	pthread_t handler, touchers[64];
	struct part parts[64];
	if (pthread_create(&handler, NULL, batched ? batched_handler_thread : handler_thread, NULL))
		die("pthread_create");
	uint64_t t0 = now_ns();
	for (unsigned t = 0; t < threads; t++) {
		parts[t] = (struct part){ .index = t };
		if (pthread_create(&touchers[t], NULL, toucher_thread, &parts[t]))
			die("pthread_create");
	}
	uint64_t sigbus = 0;
	for (unsigned t = 0; t < threads; t++) {
		pthread_join(touchers[t], NULL);
		sigbus += parts[t].sigbus;
	}
	uint64_t elapsed = now_ns() - t0;
	uint64_t one = 1;
	if (write(g.stopfd, &one, sizeof one) != sizeof one)
		die("write to the stop eventfd");
	pthread_join(handler, NULL);

	printf("{\"mode\": \"fault\", \"kind\": \"%s\", \"pages\": %zu, \"threads\": %u, "
	       "\"page_size\": %zu, \"elapsed_ns\": %" PRIu64 ", \"faults\": %" PRIu64
	       ", \"sigbus\": %" PRIu64 ", \"handler_cpu_ns\": %" PRIu64 ", \"lat_ns\": [",
	       kind_name, pages, threads, g.page_size, elapsed, g.faults, sigbus, g.handler_cpu_ns);
	for (size_t k = 0; k < pages; k++)
		printf(k ? ",%" PRIu64 : "%" PRIu64, g.lat_ns[k]);
	printf("]}\n");
	return 0;
}

/* ---- bulk modes ---------------------------------------------------------------------------- */

static int run_copybw(size_t bytes, size_t chunk)
{
	if (!bytes || !chunk || bytes % PAGE_4K || chunk % PAGE_4K) {
		fprintf(stderr, "uffd_baseline: bad copybw arguments\n");
		return 2;
	}
	char *src = pattern_buffer(bytes);
	char *dst = map_anon(bytes);
	int uffd = open_uffd(0);
	register_range(uffd, dst, bytes, UFFDIO_REGISTER_MODE_MISSING);
	uint64_t t0 = now_ns();
	for (size_t off = 0; off < bytes;) {
		size_t len = bytes - off < chunk ? bytes - off : chunk;
		struct uffdio_copy c = { .dst = (uint64_t)(uintptr_t)(dst + off),
					 .src = (uint64_t)(uintptr_t)(src + off),
					 .len = len };
		if (ioctl(uffd, UFFDIO_COPY, &c)) {
			if (errno == EAGAIN && c.copy > 0) {
				off += (size_t)c.copy;
				continue;
			}
			die("UFFDIO_COPY");
		}
		off += len;
	}
	uint64_t elapsed = now_ns() - t0;
	printf("{\"mode\": \"copybw\", \"bytes\": %zu, \"chunk\": %zu, \"elapsed_ns\": %" PRIu64 "}\n",
	       bytes, chunk, elapsed);
	return 0;
}

static int run_memcpy(size_t bytes)
{
	char *src = pattern_buffer(bytes);
	char *dst = map_anon(bytes);
	uint64_t t0 = now_ns();
	memcpy(dst, src, bytes);
	uint64_t fresh = now_ns() - t0;
	/* Keep the first copy from being folded into the second. */
	__asm__ __volatile__("" ::: "memory");
	t0 = now_ns();
	memcpy(dst, src, bytes);
	uint64_t warm = now_ns() - t0;
	printf("{\"mode\": \"memcpy\", \"bytes\": %zu, \"fresh_ns\": %" PRIu64
	       ", \"prefaulted_ns\": %" PRIu64 ", \"check\": %d}\n",
	       bytes, fresh, warm, dst[bytes / 2]);
	return 0;
}

static int run_prepoison(size_t pages, size_t stride, size_t run)
{
	if (!pages || !run || stride < run || pages % run) {
		fprintf(stderr, "uffd_baseline: bad prepoison arguments\n");
		return 2;
	}
	size_t runs = pages / run;
	size_t span = runs * stride * PAGE_4K;
	char *base = map_anon(span);
	int uffd = open_uffd(UFFD_FEATURE_POISON);
	register_range(uffd, base, span, UFFDIO_REGISTER_MODE_MISSING);
	uint64_t t0 = now_ns();
	for (size_t r = 0; r < runs; r++) {
		struct uffdio_poison p = {
			.range = { .start = (uint64_t)(uintptr_t)(base + r * stride * PAGE_4K),
				   .len = run * PAGE_4K },
		};
		if (ioctl(uffd, UFFDIO_POISON, &p))
			die("UFFDIO_POISON");
	}
	uint64_t elapsed = now_ns() - t0;
	printf("{\"mode\": \"prepoison\", \"pages\": %zu, \"stride\": %zu, \"run\": %zu, "
	       "\"ioctls\": %zu, \"elapsed_ns\": %" PRIu64 "}\n",
	       pages, stride, run, runs, elapsed);
	return 0;
}

int main(int argc, char **argv)
{
	if ((argc == 5 || argc == 7 || argc == 8) && !strcmp(argv[1], "fault")) {
		if (argc == 8 && strcmp(argv[7], "batched"))
			goto usage;
		return run_fault(argv[2], strtoull(argv[3], NULL, 0), (unsigned)strtoul(argv[4], NULL, 0),
				 argc >= 7 ? atoi(argv[5]) : -1, argc >= 7 ? atoi(argv[6]) : -1, argc == 8);
	}
	if (argc == 4 && !strcmp(argv[1], "copybw"))
		return run_copybw(strtoull(argv[2], NULL, 0), strtoull(argv[3], NULL, 0));
	if (argc == 3 && !strcmp(argv[1], "memcpy"))
		return run_memcpy(strtoull(argv[2], NULL, 0));
	if (argc == 5 && !strcmp(argv[1], "prepoison"))
		return run_prepoison(strtoull(argv[2], NULL, 0), strtoull(argv[3], NULL, 0),
				     strtoull(argv[4], NULL, 0));
usage:
	fprintf(stderr,
		"usage: uffd_baseline fault copy|zero|poison|continue|hugetlb PAGES THREADS "
		"[HANDLER_CPU TOUCHER_CPU [batched]]\n"
		"       uffd_baseline copybw BYTES CHUNK\n"
		"       uffd_baseline memcpy BYTES\n"
		"       uffd_baseline prepoison PAGES STRIDE RUN\n");
	return 2;
}
