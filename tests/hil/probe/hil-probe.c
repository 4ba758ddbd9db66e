// SPDX-License-Identifier: MIT OR Apache-2.0
// hil-probe: Dioxide's known-good reference payload for the hardware-in-loop guest.
//
// A small, independent C program that drives an NVMe controller through VFIO the plain way:
// container/group/device, BAR0 mmap, bus master, one IOMMU-mapped DMA buffer, controller
// disable/enable with an admin queue, identify controller and namespaces, one polled I/O queue
// pair, write and read back on every active namespace (4 KiB at the start and the end, and one
// transfer of up to MDTS using PRP1/PRP2 or a PRP list), an IOMMU negative test (DMA to an
// unmapped IOVA must fault in the kernel log), CC.SHN shutdown and unmap.
//
// It runs first in every HIL guest: "HIL: PASS hil-probe" next to a failing Rust payload says
// the guest, the vIOMMU and the emulated controller are fine, so the driver is at fault.
// The bring-up sequence follows the recipe in tests/hil/README.md, measured in this guest.
//
// Build: gcc -O2 -static -Wall -o hil-probe hil-probe.c
// Usage: hil-probe [--undeclared-fault] [--no-fault-test] [--iova=ADDR] [BDF]   (BDF defaults to $NVME_PCI_ADDR)
// Writes only when NVME_HIL_ALLOW_WRITE=1; only reads namespaces listed in HIL_NULL_NSIDS
// (space-separated ids of drives that store nothing, QEMU's null-co). Exit 0 on success, 1 on
// any failure.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <linux/vfio.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/klog.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static void fail(const char *fmt, ...) {
    int e = errno;
    va_list ap;
    va_start(ap, fmt);
    fputs("hil-probe: FAIL: ", stdout);
    vprintf(fmt, ap);
    va_end(ap);
    printf(" (errno %d: %s)\n", e, strerror(e));
    exit(1);
}

static double ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

// ---- registers ----
static volatile uint32_t *regs;
static uint32_t reg_rd(unsigned off) { return regs[off / 4]; }
static void reg_wr(unsigned off, uint32_t v) { regs[off / 4] = v; }
static uint64_t reg_rd64(unsigned off) { return reg_rd(off) | (uint64_t)reg_rd(off + 4) << 32; }
static void reg_wr64(unsigned off, uint64_t v) { reg_wr(off, (uint32_t)v); reg_wr(off + 4, (uint32_t)(v >> 32)); }
#define R_CAP 0x00
#define R_VS 0x08
#define R_CC 0x14
#define R_CSTS 0x1c
#define R_AQA 0x24
#define R_ASQ 0x28
#define R_ACQ 0x30

struct cmd {
    uint8_t opc, flags;
    uint16_t cid;
    uint32_t nsid, rsvd[2];
    uint64_t mptr, prp1, prp2;
    uint32_t cdw10, cdw11, cdw12, cdw13, cdw14, cdw15;
};
struct cpl {
    uint32_t dw0, dw1;
    uint16_t sqhd, sqid, cid, sf;
};
_Static_assert(sizeof(struct cmd) == 64, "SQE is 64 bytes");
_Static_assert(sizeof(struct cpl) == 16, "CQE is 16 bytes");

// ---- DMA arena: one buffer, one IOVA range, bump allocation in 4 KiB pages ----
#define ARENA (2u << 20)
// Default IOVA of the arena (256 MiB). Observed in the QEMU 10.0 guest: with the arena at 4 GiB
// (--iova=0x100000000) queues work but data transfers complete with SC 0x04 (Data Transfer Error).
static uint64_t iova_base = 0x10000000ULL;
#define UNMAPPED_IOVA 0x7f000000ULL
static uint8_t *arena;
static size_t arena_used;
static void *dma_alloc(size_t len, uint64_t *iova) {
    len = (len + 4095) & ~(size_t)4095;
    if (arena_used + len > ARENA) { errno = ENOMEM; fail("DMA arena exhausted"); }
    void *p = arena + arena_used;
    *iova = iova_base + arena_used;
    arena_used += len;
    memset(p, 0, len);
    return p;
}
static uint64_t iova_of(const void *p) { return iova_base + (uint64_t)((const uint8_t *)p - arena); }

struct queue {
    volatile struct cmd *sq;
    volatile struct cpl *cq;
    uint16_t depth, tail, head, phase, next_cid;
    unsigned sq_db, cq_db;
};
static unsigned db_stride;
static double timeout_ms;

static void queue_init(struct queue *q, unsigned qid, uint16_t depth) {
    uint64_t unused;
    q->sq = dma_alloc(depth * sizeof(struct cmd), &unused);
    q->cq = dma_alloc(depth * sizeof(struct cpl), &unused);
    q->depth = depth;
    q->tail = q->head = 0;
    q->phase = 1;
    q->next_cid = 1;
    q->sq_db = 0x1000 + (2 * qid) * db_stride;
    q->cq_db = 0x1000 + (2 * qid + 1) * db_stride;
}

// Submit one command and poll its completion. Returns the NVMe status field (0 = success).
static int run_cmd(struct queue *q, struct cmd c, struct cpl *out) {
    c.cid = q->next_cid++;
    memcpy((void *)&q->sq[q->tail], &c, sizeof c);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    q->tail = (q->tail + 1) % q->depth;
    reg_wr(q->sq_db, q->tail);
    double t0 = ms();
    for (;;) {
        volatile struct cpl *e = &q->cq[q->head];
        if ((e->sf & 1) == q->phase) {
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            struct cpl r;
            memcpy(&r, (const void *)e, sizeof r);
            if (++q->head == q->depth) { q->head = 0; q->phase ^= 1; }
            reg_wr(q->cq_db, q->head);
            if (r.cid != c.cid) { errno = EPROTO; fail("completion for cid %u, expected %u", r.cid, c.cid); }
            if (out) *out = r;
            return r.sf >> 1;
        }
        if (ms() - t0 > 5000) { errno = ETIMEDOUT; fail("command opcode 0x%02x timed out, CSTS=0x%x", c.opc, reg_rd(R_CSTS)); }
    }
}

static void wait_ready(int want) {
    double t0 = ms();
    while ((int)(reg_rd(R_CSTS) & 1) != want) {
        if (reg_rd(R_CSTS) & 2) { errno = EIO; fail("CSTS.CFS (controller fatal) set"); }
        if (ms() - t0 > timeout_ms) { errno = ETIMEDOUT; fail("CSTS.RDY did not become %d within CAP.TO", want); }
        usleep(50);
    }
}

static size_t klog_matches(const char *needle) {
    static char buf[1 << 20];
    int n = klogctl(3 /* SYSLOG_ACTION_READ_ALL */, buf, sizeof buf - 1);
    size_t count = 0;
    if (n <= 0) return 0;
    buf[n] = 0;
    for (char *p = buf; (p = strstr(p, needle)) != NULL; p++) count++;
    return count;
}

static void print_str(const char *label, const uint8_t *p, int n) {
    while (n > 0 && (p[n - 1] == ' ' || p[n - 1] == 0)) n--;
    printf("  %s: %.*s\n", label, n, (const char *)p);
}

// Read/write `nblocks` starting at `lba` from/to `buf` (in the arena), building PRPs.
static int rw(struct queue *q, uint8_t opc, uint32_t nsid, uint64_t lba, uint32_t nblocks, uint8_t *buf, size_t len,
              uint64_t *prp_list) {
    struct cmd c = { .opc = opc, .nsid = nsid };
    size_t pages = len / 4096;
    c.prp1 = iova_of(buf);
    if (pages == 2) c.prp2 = iova_of(buf + 4096);
    if (pages > 2) {
        for (size_t i = 1; i < pages; i++) prp_list[i - 1] = iova_of(buf + i * 4096);
        c.prp2 = iova_of(prp_list);
    }
    c.cdw10 = (uint32_t)lba;
    c.cdw11 = (uint32_t)(lba >> 32);
    c.cdw12 = nblocks - 1;
    return run_cmd(q, c, NULL);
}

// Whether `list` (space-separated decimal ids, may be NULL) names `id`.
static int listed(const char *list, uint32_t id) {
    for (const char *p = list; p && *p;) {
        char *end;
        unsigned long v = strtoul(p, &end, 10);
        if (end == p) { p++; continue; }
        if (v == id) return 1;
        p = end;
    }
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int declare_fault = 1, fault_test = 1;
    const char *bdf = getenv("NVME_PCI_ADDR");
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--undeclared-fault")) declare_fault = 0;
        else if (!strcmp(argv[i], "--no-fault-test")) fault_test = 0;
        else if (!strncmp(argv[i], "--iova=", 7)) iova_base = strtoull(argv[i] + 7, NULL, 0);
        else if (argv[i][0] != '-') bdf = argv[i];
        else { fprintf(stderr, "usage: %s [--undeclared-fault] [--no-fault-test] [--iova=ADDR] [BDF]\n", argv[0]); return 2; }
    }
    if (!bdf || !*bdf) { fprintf(stderr, "hil-probe: no BDF given and NVME_PCI_ADDR unset\n"); return 2; }
    const char *aw = getenv("NVME_HIL_ALLOW_WRITE");
    int allow_write = aw && !strcmp(aw, "1");
    double t_start = ms();

    // ---- VFIO ----
    char path[256], link[256];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/iommu_group", bdf);
    ssize_t n = readlink(path, link, sizeof link - 1);
    if (n < 0) fail("%s: no IOMMU group (IOMMU off?)", path);
    link[n] = 0;
    snprintf(path, sizeof path, "/dev/vfio/%s", basename(link));
    int container = open("/dev/vfio/vfio", O_RDWR);
    if (container < 0) fail("open /dev/vfio/vfio");
    if (ioctl(container, VFIO_GET_API_VERSION) != VFIO_API_VERSION) fail("unexpected VFIO API version");
    if (ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) != 1) fail("no VFIO type1v2 IOMMU");
    int group = open(path, O_RDWR);
    if (group < 0) fail("open %s (device bound to vfio-pci?)", path);
    struct vfio_group_status gs = { .argsz = sizeof gs };
    if (ioctl(group, VFIO_GROUP_GET_STATUS, &gs) || !(gs.flags & VFIO_GROUP_FLAGS_VIABLE))
        fail("group %s not viable", path);
    if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container)) fail("VFIO_GROUP_SET_CONTAINER");
    if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)) fail("VFIO_SET_IOMMU(type1v2)");
    int dev = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bdf);
    if (dev < 0) fail("VFIO_GROUP_GET_DEVICE_FD %s", bdf);
    printf("vfio: %s group %s opened (%.1f ms)\n", bdf, path, ms() - t_start);

    struct vfio_region_info cfg = { .argsz = sizeof cfg, .index = VFIO_PCI_CONFIG_REGION_INDEX };
    if (ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &cfg)) fail("config region info");
    uint16_t pcicmd;
    if (pread(dev, &pcicmd, 2, cfg.offset + 4) != 2) fail("read PCI command");
    pcicmd |= 0x0406;  // memory space, bus master, INTx disable
    if (pwrite(dev, &pcicmd, 2, cfg.offset + 4) != 2) fail("write PCI command");

    struct vfio_region_info bar = { .argsz = sizeof bar, .index = VFIO_PCI_BAR0_REGION_INDEX };
    if (ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &bar)) fail("BAR0 region info");
    if (!(bar.flags & VFIO_REGION_INFO_FLAG_MMAP) || bar.size < 0x2000) { errno = EINVAL; fail("BAR0 not mmappable"); }
    void *m = mmap(NULL, bar.size, PROT_READ | PROT_WRITE, MAP_SHARED, dev, bar.offset);
    if (m == MAP_FAILED) fail("mmap BAR0");
    regs = m;

    uint64_t cap = reg_rd64(R_CAP);
    uint32_t vs = reg_rd(R_VS);
    if (cap == ~0ULL) { errno = EIO; fail("CAP reads all ones (device gone?)"); }
    db_stride = 4u << ((cap >> 32) & 0xf);
    timeout_ms = (((cap >> 24) & 0xff) + 1) * 500.0;
    unsigned mqes = (unsigned)(cap & 0xffff) + 1;
    printf("nvme: CAP=0x%016llx VS=%u.%u.%u MQES=%u DSTRD=%u TO=%.0fms\n", (unsigned long long)cap, vs >> 16,
           (vs >> 8) & 0xff, vs & 0xff, mqes, db_stride, timeout_ms - 500);
    if (((cap >> 48) & 0xf) != 0) { errno = EINVAL; fail("controller does not support 4 KiB pages"); }

    // ---- DMA arena ----
    arena = mmap(NULL, ARENA, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
    int huge = arena != MAP_FAILED;
    if (!huge) arena = mmap(NULL, ARENA, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (arena == MAP_FAILED) fail("mmap DMA arena");
    struct vfio_iommu_type1_dma_map map = { .argsz = sizeof map, .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                                            .vaddr = (uintptr_t)arena, .iova = iova_base, .size = ARENA };
    if (ioctl(container, VFIO_IOMMU_MAP_DMA, &map)) fail("VFIO_IOMMU_MAP_DMA");
    printf("dma: 2 MiB at iova 0x%llx (%s)\n", (unsigned long long)iova_base, huge ? "hugepage" : "NOT a hugepage: none reserved?");

    // ---- controller bring-up ----
    uint16_t depth = mqes < 32 ? mqes : 32;
    reg_wr(R_CC, reg_rd(R_CC) & ~1u);
    wait_ready(0);
    struct queue admin, io;
    queue_init(&admin, 0, depth);
    reg_wr(R_AQA, (uint32_t)(depth - 1) << 16 | (depth - 1));
    reg_wr64(R_ASQ, iova_of((void *)admin.sq));
    reg_wr64(R_ACQ, iova_of((void *)admin.cq));
    reg_wr(R_CC, 4u << 20 | 6u << 16 | 1u);  // IOCQES=16 B, IOSQES=64 B, MPS=4 KiB, NVM, EN
    wait_ready(1);
    printf("nvme: enabled (%.1f ms since start)\n", ms() - t_start);

    uint64_t id_iova;
    uint8_t *id = dma_alloc(4096, &id_iova);
    struct cmd c = { .opc = 0x06, .prp1 = id_iova, .cdw10 = 1 };
    int st = run_cmd(&admin, c, NULL);
    if (st) fail("IDENTIFY controller failed: status 0x%x (SCT %u SC 0x%02x)", st, (st >> 8) & 7, st & 0xff);
    uint32_t nn;
    memcpy(&nn, id + 516, 4);
    unsigned mdts = id[77];
    printf("identify: VID=0x%04x NN=%u MDTS=%u\n", id[0] | id[1] << 8, nn, mdts);
    print_str("serial", id + 4, 20);
    print_str("model", id + 24, 40);
    print_str("firmware", id + 64, 8);
    size_t max_xfer = mdts ? (size_t)4096 << mdts : (size_t)1 << 20;
    size_t xfer = max_xfer < 64 * 1024 ? max_xfer : 64 * 1024;

    c = (struct cmd){ .opc = 0x05, .cdw10 = (uint32_t)(depth - 1) << 16 | 1, .cdw11 = 1 };  // create I/O CQ 1, PC
    queue_init(&io, 1, depth);
    c.prp1 = iova_of((void *)io.cq);
    if (run_cmd(&admin, c, NULL)) fail("CREATE I/O CQ failed");
    c = (struct cmd){ .opc = 0x01, .prp1 = iova_of((void *)io.sq), .cdw10 = (uint32_t)(depth - 1) << 16 | 1,
                      .cdw11 = 1u << 16 | 1 };  // create I/O SQ 1 on CQ 1, PC
    if (run_cmd(&admin, c, NULL)) fail("CREATE I/O SQ failed");

    // ---- every active namespace ----
    uint64_t unused;
    uint8_t *wbuf = dma_alloc(xfer, &unused), *rbuf = dma_alloc(xfer, &unused);
    uint64_t *prp_list = dma_alloc(4096, &unused);
    int checked = 0;
    for (uint32_t nsid = 1; nsid <= nn && nsid <= 16; nsid++) {
        memset(id, 0, 4096);
        c = (struct cmd){ .opc = 0x06, .nsid = nsid, .prp1 = id_iova, .cdw10 = 0 };
        if (run_cmd(&admin, c, NULL)) fail("IDENTIFY namespace %u failed", nsid);
        uint64_t nsze;
        memcpy(&nsze, id, 8);
        if (!nsze) continue;
        uint32_t lbaf;
        memcpy(&lbaf, id + 128 + 4 * (id[26] & 0xf), 4);
        unsigned bs = 1u << ((lbaf >> 16) & 0xff);
        printf("ns%u: %llu blocks of %u B\n", nsid, (unsigned long long)nsze, bs);
        int writes = allow_write && !listed(getenv("HIL_NULL_NSIDS"), nsid);
        if (!allow_write) { printf("ns%u: NVME_HIL_ALLOW_WRITE!=1: read-only check\n", nsid); }
        else if (!writes) { printf("ns%u: in HIL_NULL_NSIDS (stores nothing): read-only check\n", nsid); }
        struct { uint64_t lba; size_t len; } io_list[] = {
            { 0, 4096 }, { nsze - 4096 / bs, 4096 }, { nsze / 2, xfer },
        };
        for (unsigned k = 0; k < sizeof io_list / sizeof io_list[0]; k++) {
            uint64_t lba = io_list[k].lba;
            size_t len = io_list[k].len;
            uint32_t nb = (uint32_t)(len / bs);
            for (size_t i = 0; i < len; i++) wbuf[i] = (uint8_t)(i * 31 + lba * 7 + nsid * 13 + k);
            if (writes && rw(&io, 0x01, nsid, lba, nb, wbuf, len, prp_list))
                fail("ns%u WRITE lba %llu len %zu failed", nsid, (unsigned long long)lba, len);
            memset(rbuf, 0xee, len);
            if (rw(&io, 0x02, nsid, lba, nb, rbuf, len, prp_list))
                fail("ns%u READ lba %llu len %zu failed", nsid, (unsigned long long)lba, len);
            if (writes && memcmp(wbuf, rbuf, len)) {
                errno = EIO;
                fail("ns%u lba %llu len %zu: read-back differs from what was written", nsid, (unsigned long long)lba, len);
            }
            printf("ns%u: lba %llu len %zu %s\n", nsid, (unsigned long long)lba, len, writes ? "write+read-back ok" : "read ok");
        }
        checked++;
    }
    if (!checked) { errno = ENODEV; fail("no active namespace"); }

    // ---- IOMMU negative test: DMA to an unmapped IOVA must fault ----
    if (fault_test) {
        char needle[64];
        snprintf(needle, sizeof needle, "fault addr 0x%llx", UNMAPPED_IOVA);
        size_t before = klog_matches(needle), after = before;
        if (declare_fault) printf("HIL: EXPECT-DMAR-FAULTS 1 addr=0x%llx\n", UNMAPPED_IOVA);
        c = (struct cmd){ .opc = 0x06, .prp1 = UNMAPPED_IOVA, .cdw10 = 1 };
        st = run_cmd(&admin, c, NULL);
        for (int i = 0; i < 100 && after == before; i++) { usleep(10000); after = klog_matches(needle); }
        printf("iommu: IDENTIFY to unmapped iova 0x%llx: status 0x%x, new fault lines %zu\n", UNMAPPED_IOVA, st, after - before);
        if (after == before) { errno = EFAULT; fail("no IOMMU fault for DMA to an unmapped IOVA: the IOMMU is not enforcing"); }
    }

    // ---- shutdown ----
    reg_wr(R_CC, (reg_rd(R_CC) & ~(3u << 14)) | 1u << 14);
    double t0 = ms();
    while (((reg_rd(R_CSTS) >> 2) & 3) != 2) {
        if (ms() - t0 > timeout_ms) { errno = ETIMEDOUT; fail("shutdown did not complete"); }
        usleep(50);
    }
    struct vfio_iommu_type1_dma_unmap unmap = { .argsz = sizeof unmap, .iova = iova_base, .size = ARENA };
    if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap)) fail("VFIO_IOMMU_UNMAP_DMA");
    printf("hil-probe: OK, %d namespace(s), %.1f ms\n", checked, ms() - t_start);
    return 0;
}
