/*
 * Which functions a corral broker and its worker run: a one-shot
 * breakpoint (int3) at the entry of every function of the binary, set in
 * the broker's memory and in its first worker's when they exec, taken out
 * when first hit. Used by order.sh; a developer's tool, not part of corral.
 *
 *   fcov SYMS WORKER_OUT BROKER_OUT -- corral broker ARGS...
 *
 * SYMS: "hexaddr name" lines (addresses as in the binary, from nm). The
 * outputs: the names each hit, in the order of their first hit. The broker
 * runs traced (fork, vfork, clone and exec followed).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

struct fn {
	unsigned long addr;
	char *name;
	unsigned char orig;
	int hit[2]; /* by the worker, by the broker */
};

static struct fn *fns;
static size_t nfns;

static int by_addr(const void *a, const void *b)
{
	unsigned long x = ((const struct fn *)a)->addr, y = ((const struct fn *)b)->addr;
	return x < y ? -1 : x > y;
}

static struct fn *find(unsigned long addr)
{
	size_t lo = 0, hi = nfns;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (fns[mid].addr < addr)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < nfns && fns[lo].addr == addr ? &fns[lo] : NULL;
}

/* argv[1] of the process is "worker". */
static int is_worker(pid_t pid)
{
	char path[64], buf[256];
	snprintf(path, sizeof path, "/proc/%d/cmdline", pid);
	FILE *f = fopen(path, "r");
	if (!f)
		return 0;
	size_t n = fread(buf, 1, sizeof buf - 1, f);
	fclose(f);
	buf[n] = 0;
	size_t first = strlen(buf);
	return first + 1 < n && strcmp(buf + first + 1, "worker") == 0;
}

/* Where the executable's first segment (file offset 0) is mapped. */
static unsigned long load_base(pid_t pid)
{
	char path[64], line[4096], exe[4096];
	snprintf(path, sizeof path, "/proc/%d/exe", pid);
	ssize_t n = readlink(path, exe, sizeof exe - 1);
	if (n <= 0)
		return 0;
	exe[n] = 0;
	snprintf(path, sizeof path, "/proc/%d/maps", pid);
	FILE *f = fopen(path, "r");
	unsigned long base = 0;
	while (f && fgets(line, sizeof line, f)) {
		unsigned long start, end, off;
		char perm[8];
		line[strcspn(line, "\n")] = 0;
		size_t len = strlen(line), elen = strlen(exe);
		if (sscanf(line, "%lx-%lx %7s %lx", &start, &end, perm, &off) == 4 && off == 0 && len >= elen &&
		    strcmp(line + len - elen, exe) == 0) {
			base = start;
			break;
		}
	}
	if (f)
		fclose(f);
	return base;
}

/* Writes one byte of the tracee's memory; the old one in *old. */
static int poke_byte(pid_t pid, unsigned long addr, unsigned char byte, unsigned char *old)
{
	unsigned long word = addr & ~7UL;
	int shift = (int)(addr - word) * 8;
	errno = 0;
	long w = ptrace(PTRACE_PEEKDATA, pid, word, 0);
	if (errno)
		return -1;
	if (old)
		*old = (w >> shift) & 0xff;
	w = (w & ~(0xffL << shift)) | ((long)byte << shift);
	return ptrace(PTRACE_POKEDATA, pid, word, w) == 0 ? 0 : -1;
}

static void read_symbols(const char *path)
{
	FILE *f = fopen(path, "r");
	if (!f) {
		perror(path);
		exit(2);
	}
	char line[8192];
	size_t cap = 0;
	while (fgets(line, sizeof line, f)) {
		line[strcspn(line, "\n")] = 0;
		char *name = strchr(line, ' ');
		if (!name)
			continue;
		*name++ = 0;
		if (nfns == cap) {
			cap = cap ? cap * 2 : 4096;
			fns = realloc(fns, cap * sizeof *fns);
			if (!fns)
				exit(2);
		}
		fns[nfns++] = (struct fn){ .addr = strtoul(line, NULL, 16), .name = strdup(name) };
	}
	fclose(f);
	qsort(fns, nfns, sizeof *fns, by_addr);
	/* Aliases share an entry: one breakpoint, the first name. */
	size_t kept = 0;
	for (size_t i = 0; i < nfns; i++)
		if (!kept || fns[kept - 1].addr != fns[i].addr)
			fns[kept++] = fns[i];
	nfns = kept;
}

int main(int argc, char **argv)
{
	if (argc < 6 || strcmp(argv[4], "--") != 0) {
		fprintf(stderr, "usage: fcov SYMS WORKER_OUT BROKER_OUT -- corral broker ARGS...\n");
		return 2;
	}
	read_symbols(argv[1]);
	FILE *out[2];
	for (int i = 0; i < 2; i++) {
		out[i] = fopen(argv[2 + i], "w");
		if (!out[i]) {
			perror(argv[2 + i]);
			return 2;
		}
		setvbuf(out[i], NULL, _IOLBF, 0);
	}

	pid_t broker = fork();
	if (broker == 0) {
		ptrace(PTRACE_TRACEME, 0, 0, 0);
		raise(SIGSTOP);
		execvp(argv[5], argv + 5);
		_exit(127);
	}
	int status;
	waitpid(broker, &status, 0);
	ptrace(PTRACE_SETOPTIONS, broker, 0,
	       PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK | PTRACE_O_TRACECLONE | PTRACE_O_TRACEEXEC |
		       PTRACE_O_EXITKILL);
	ptrace(PTRACE_CONT, broker, 0, 0);

	int worker_armed = 0, broker_armed = 0;
	for (;;) {
		pid_t pid = waitpid(-1, &status, __WALL);
		if (pid < 0)
			break;
		if (WIFEXITED(status) || WIFSIGNALED(status)) {
			if (pid == broker)
				break;
			continue;
		}
		int sig = WSTOPSIG(status), event = status >> 16, deliver = 0;
		if (sig == SIGTRAP && event == PTRACE_EVENT_EXEC) {
			int worker = is_worker(pid);
			if (worker ? !worker_armed : (pid == broker && !broker_armed)) {
				unsigned long base = load_base(pid);
				size_t set = 0;
				for (size_t i = 0; i < nfns; i++)
					set += poke_byte(pid, base + fns[i].addr, 0xcc, &fns[i].orig) == 0;
				*(worker ? &worker_armed : &broker_armed) = 1;
				fprintf(stderr, "fcov: %zu breakpoints in %s %d\n", set, worker ? "worker" : "broker", pid);
			}
		} else if (sig == SIGTRAP && event == 0) {
			struct user_regs_struct regs;
			ptrace(PTRACE_GETREGS, pid, 0, &regs);
			int role = is_worker(pid) ? 0 : 1;
			struct fn *f = find(regs.rip - 1 - load_base(pid));
			if (f) {
				poke_byte(pid, regs.rip - 1, f->orig, NULL);
				regs.rip--;
				ptrace(PTRACE_SETREGS, pid, 0, &regs);
				if (!f->hit[role]) {
					f->hit[role] = 1;
					fprintf(out[role], "%s\n", f->name);
				}
			} else {
				deliver = sig;
			}
		} else if (event == 0 && sig != SIGSTOP) {
			/* A signal of the program's own: deliver it. (SIGSTOP is a
			 * new child's first stop; fork, clone and exec events
			 * need nothing.) */
			deliver = sig;
		}
		ptrace(PTRACE_CONT, pid, 0, deliver);
	}
	return 0;
}
