/*
 * foreign_vmm.c - a tiny standalone KVM virtual machine monitor, written in C.
 *
 * Used by the vmtrace end-to-end tests to show that the agent counts KVM exits
 * and virtio doorbell kicks for a VMM that is NOT the project's own Rust
 * reference VMM: another binary, another language, no shared code, only the
 * raw /dev/kvm ioctls from <linux/kvm.h>.
 *
 * One real-mode vCPU (no irqchip, 64 KiB of RAM at GPA 0) runs guest code that
 * does N `out 0x10, al` port writes (each a KVM_EXIT_IO to us), then K0 32-bit
 * writes of 0 and K1 writes of 1 to the virtio-mmio QueueNotify register at
 * GPA 0xD0050. Two ioeventfds (datamatch 0 and 1) complete those writes inside
 * the kernel, so they never reach userspace; their number is read back from
 * the eventfd counters. Then `out 0x11, al` says DONE, and the doorbells are
 * removed (KVM_IOEVENTFD with DEASSIGN) before the VMM exits.
 *
 * Build: cc -O2 -Wall -Wextra -Werror -o /tmp/foreign_vmm foreign_vmm.c
 * Usage: foreign_vmm [--port-writes N] [--kicks-q0 N] [--kicks-q1 N] [--cgroup DIR]
 * Prints one JSON object on stdout (see README.md). Exit status: 0 = every
 * count exact, 1 = KVM error, unexpected exit or count mismatch, 2 = bad usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define MEM_SIZE   0x10000   /* 64 KiB of guest RAM at GPA 0 */
#define CODE_GPA   0x1000
#define DOORBELL   0xD0050   /* virtio-mmio QueueNotify: base 0xD0000 + 0x50 */
#define PORT_WRITE 0x10
#define PORT_DONE  0x11

/* 16-bit real-mode guest, at CS:IP 0000:1000. The VMM sets ECX = N, ESI = K0,
 * EDI = K1; the 0x66 prefix makes test/dec/mov 32-bit, so counts up to
 * 2^32-1 work, and a count of 0 skips its loop. Offsets are decimal. */
static const uint8_t guest_code[] = {
	0xB8, 0x00, 0xD0,                   /* 00: mov ax, 0xD000                  */
	0x8E, 0xC0,                         /* 03: mov es, ax    ; ES base 0xD0000 */
	0x66, 0x85, 0xC9,                   /* 05: test ecx, ecx                   */
	0x74, 0x06,                         /* 08: jz 16                           */
	0xE6, PORT_WRITE,                   /* 10: out 0x10, al                    */
	0x66, 0x49,                         /* 12: dec ecx                         */
	0x75, 0xFA,                         /* 14: jnz 10                          */
	0x66, 0x85, 0xF6,                   /* 16: test esi, esi                   */
	0x74, 0x0E,                         /* 19: jz 35                           */
	0x26, 0x66, 0xC7, 0x06, 0x50, 0x00, 0x00, 0x00, 0x00, 0x00, /* 21: mov dword es:[0x50], 0 */
	0x66, 0x4E,                         /* 31: dec esi                         */
	0x75, 0xF2,                         /* 33: jnz 21                          */
	0x66, 0x85, 0xFF,                   /* 35: test edi, edi                   */
	0x74, 0x0E,                         /* 38: jz 54                           */
	0x26, 0x66, 0xC7, 0x06, 0x50, 0x00, 0x01, 0x00, 0x00, 0x00, /* 40: mov dword es:[0x50], 1 */
	0x66, 0x4F,                         /* 50: dec edi                         */
	0x75, 0xF2,                         /* 52: jnz 40                          */
	0xE6, PORT_DONE,                    /* 54: out 0x11, al  ; DONE            */
	0xF4,                               /* 56: hlt                             */
	0xEB, 0xFD,                         /* 57: jmp 56                          */
};

static void die(const char *what)
{
	fprintf(stderr, "foreign_vmm: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void usage(const char *msg, const char *opt, const char *val)
{
	fprintf(stderr, "foreign_vmm: %s%s%s (usage: foreign_vmm [--port-writes N] [--kicks-q0 N]"
		" [--kicks-q1 N] [--cgroup DIR])\n", opt, msg, val ? val : "");
	exit(2);
}

static uint32_t parse_count(const char *opt, const char *s)
{
	unsigned long long v;
	char *end;

	errno = 0;
	v = s ? strtoull(s, &end, 10) : 0;
	if (!s || *s < '0' || *s > '9' || *end || errno || v > 0xFFFFFFFFull)
		usage(" needs a count in 0..4294967295, got: ", opt, s ? s : "nothing");
	return (uint32_t)v;
}

/* mkdir -p DIR, then move this process into it (cgroup v2: DIR/cgroup.procs). */
static void join_cgroup(const char *dir)
{
	char path[4096], *p;
	FILE *f;

	if (snprintf(path, sizeof(path), "%s/cgroup.procs", dir) >= (int)sizeof(path))
		usage(": path too long", "--cgroup", NULL);
	path[strlen(dir)] = '\0';
	for (p = path + 1;; p++) {
		char c = *p;
		if (c != '/' && c != '\0')
			continue;
		*p = '\0';
		if (mkdir(path, 0755) && errno != EEXIST)
			die(path);
		if (!(*p = c))
			break;
	}
	*p = '/';
	if (!(f = fopen(path, "w")))
		die(path);
	if (fprintf(f, "%d\n", (int)getpid()) < 0 || fclose(f))
		die(path);
}

static int add_ioeventfd(int vm, uint64_t datamatch)
{
	struct kvm_ioeventfd io = {
		.datamatch = datamatch, .addr = DOORBELL, .len = 4,
		.fd = eventfd(0, EFD_NONBLOCK), .flags = KVM_IOEVENTFD_FLAG_DATAMATCH,
	};

	if (io.fd < 0)
		die("eventfd");
	if (ioctl(vm, KVM_IOEVENTFD, &io) < 0)
		die("KVM_IOEVENTFD");
	return io.fd;
}

/* Removes a doorbell, as VMMs do when a device resets or the VM shuts down. */
static void remove_ioeventfd(int vm, uint64_t datamatch, int efd)
{
	struct kvm_ioeventfd io = {
		.datamatch = datamatch, .addr = DOORBELL, .len = 4, .fd = efd,
		.flags = KVM_IOEVENTFD_FLAG_DATAMATCH | KVM_IOEVENTFD_FLAG_DEASSIGN,
	};

	if (ioctl(vm, KVM_IOEVENTFD, &io) < 0)
		die("KVM_IOEVENTFD deassign");
}

static uint64_t read_eventfd(int efd)
{
	uint64_t v = 0;

	if (read(efd, &v, sizeof(v)) == sizeof(v))
		return v;
	if (errno != EAGAIN)
		die("read eventfd");
	return 0; /* counter is 0: no write completed */
}

int main(int argc, char **argv)
{
	unsigned long long io = 0, mmio = 0, hlt = 0, other = 0, eintr = 0, seen = 0;
	uint32_t n = 0, k0 = 0, k1 = 0;
	const char *cgroup = NULL;
	char cgid[32] = "null";
	struct kvm_sregs sregs;
	struct kvm_regs regs = { .rip = CODE_GPA, .rflags = 0x2 };
	struct kvm_run *run;
	int kvm, vm, vcpu, efd0, efd1, done = 0;
	long run_size;
	uint8_t *mem;

	for (int i = 1; i < argc; i += 2) {
		const char *a = argv[i], *v = argv[i + 1]; /* argv[argc] is NULL */
		if (!strcmp(a, "--port-writes"))
			n = parse_count(a, v);
		else if (!strcmp(a, "--kicks-q0"))
			k0 = parse_count(a, v);
		else if (!strcmp(a, "--kicks-q1"))
			k1 = parse_count(a, v);
		else if (!strcmp(a, "--cgroup") && (cgroup = v) && v[0] == '/')
			;
		else
			usage(strcmp(a, "--cgroup") ? ": unknown argument" : " needs an absolute directory",
			      a, NULL);
	}

	if (cgroup) { /* before /dev/kvm is opened, so the whole VM lives there */
		struct stat st;
		join_cgroup(cgroup);
		if (stat(cgroup, &st))
			die(cgroup);
		snprintf(cgid, sizeof(cgid), "%llu", (unsigned long long)st.st_ino);
	}

	if ((kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC)) < 0)
		die("/dev/kvm");
	if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
		die("KVM_GET_API_VERSION");
	if (ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_IOEVENTFD) <= 0)
		die("KVM_CAP_IOEVENTFD");
	if ((vm = ioctl(kvm, KVM_CREATE_VM, 0)) < 0)
		die("KVM_CREATE_VM");

	mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap guest memory");
	memcpy(mem + CODE_GPA, guest_code, sizeof(guest_code));
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
		.userspace_addr = (uint64_t)(uintptr_t)mem,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
	efd0 = add_ioeventfd(vm, 0);
	efd1 = add_ioeventfd(vm, 1);

	if ((vcpu = ioctl(vm, KVM_CREATE_VCPU, 0)) < 0)
		die("KVM_CREATE_VCPU");
	if ((run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)) < (long)sizeof(*run))
		die("KVM_GET_VCPU_MMAP_SIZE");
	run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	regs.rcx = n;
	regs.rsi = k0;
	regs.rdi = k1;
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");

	while (!done) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno != EINTR)
				die("KVM_RUN");
			eintr++; /* a signal interrupted the vCPU: just run it again */
			continue;
		}
		switch (run->exit_reason) {
		case KVM_EXIT_IO:
			io++;
			if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == PORT_WRITE) {
				seen += run->io.count;
				continue;
			}
			if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == PORT_DONE) {
				done = 1;
				continue;
			}
			fprintf(stderr, "foreign_vmm: unexpected port I/O: %s port 0x%x\n",
				run->io.direction == KVM_EXIT_IO_OUT ? "out" : "in", run->io.port);
			return 1;
		case KVM_EXIT_MMIO: /* all guest MMIO is the doorbell: in-kernel, never here */
			fprintf(stderr, "foreign_vmm: unexpected MMIO exit at 0x%llx len %u%s\n",
				(unsigned long long)run->mmio.phys_addr, run->mmio.len,
				run->mmio.phys_addr == DOORBELL ? " (ioeventfd did not match)" : "");
			return mmio++, 1;
		case KVM_EXIT_HLT:
			fprintf(stderr, "foreign_vmm: guest halted before DONE\n");
			return hlt++, 1;
		case KVM_EXIT_INTR:
			eintr++;
			continue;
		default:
			other++;
			fprintf(stderr, "foreign_vmm: unexpected exit reason %u%s (hw 0x%llx, suberror %u)\n",
				run->exit_reason,
				run->exit_reason == KVM_EXIT_SHUTDOWN ? " shutdown" :
				run->exit_reason == KVM_EXIT_FAIL_ENTRY ? " fail_entry" :
				run->exit_reason == KVM_EXIT_INTERNAL_ERROR ? " internal_error" : "",
				(unsigned long long)run->fail_entry.hardware_entry_failure_reason,
				run->internal.suberror);
			return 1;
		}
	}

	uint64_t got0 = read_eventfd(efd0), got1 = read_eventfd(efd1);
	remove_ioeventfd(vm, 0, efd0);
	remove_ioeventfd(vm, 1, efd1);
	printf("{\"vmm\":\"foreign_vmm\",\"pid\":%d,\"cgroup_id\":%s,\"port_writes\":%llu,"
	       "\"exits\":{\"io\":%llu,\"mmio\":%llu,\"hlt\":%llu,\"other\":%llu,\"eintr\":%llu},"
	       "\"kicks\":{\"0\":%llu,\"1\":%llu},\"doorbell\":{\"addr\":%d,\"len\":4}}\n",
	       (int)getpid(), cgid, seen, io, mmio, hlt, other, eintr,
	       (unsigned long long)got0, (unsigned long long)got1, DOORBELL);
	fflush(stdout);
	if (seen != n || got0 != k0 || got1 != k1) {
		fprintf(stderr, "foreign_vmm: count mismatch: port writes %llu/%u, q0 %llu/%u, q1 %llu/%u\n",
			seen, n, (unsigned long long)got0, k0, (unsigned long long)got1, k1);
		return 1;
	}
	return 0;
}
