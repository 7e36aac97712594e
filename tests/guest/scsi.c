/*
 * virtio-pci (modern) + virtio-scsi driver for the test guest, polling
 * (no interrupts: every queue's MSI-X vector is NO_VECTOR). Included by
 * main.c. Works against ringvm and QEMU's virtio-scsi-pci alike.
 *
 *   work=scsi-verify  [mib=N per LUN (0: whole disk)] [bs=BYTES] [qd=N] [seed=N]
 *                     [passes=N: verify N times after writing (default 1)]
 *   work=scsi-errors  (out-of-range LBA and write-protect sense checks)
 *   work=scsi-bench   pattern=randread|read|write bs=BYTES qd=N secs=N (writes carry
 *                     scsi-verify's pattern for seed=N; a completion 30 s late fails)
 *   work=scsi-unplug  [secs=N] (needs 2+ LUNs: negotiates HOTPLUG, reads the
 *                     last LUN until the device reports it removed, then
 *                     checks it is gone and the others are not)
 */
static inline void outl(u16 p, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(p)); }
static inline u32 inl(u16 p) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(p)); return v; }
#define mb() __asm__ volatile("mfence" ::: "memory")

static u32 pci_rd(u32 dev, u32 off) { outl(0xcf8, 0x80000000u | dev << 11 | (off & 0xfc)); return inl(0xcfc); }
static void pci_wr(u32 dev, u32 off, u32 v) { outl(0xcf8, 0x80000000u | dev << 11 | (off & 0xfc)); outl(0xcfc, v); }

static volatile u8 *vcommon, *vdevcfg, *vnotify;
static u32 notify_mult;
static u64 heap_next, heap_end;

static void *alloc(u64 len, u64 align) {
    u64 p = (heap_next + align - 1) & ~(align - 1);
    if (p + len > heap_end) { printk("ringvm-guest: out of memory for buffers\n"); guest_exit(3); }
    heap_next = p + len;
    for (volatile u8 *z = (u8 *)p; z < (u8 *)(p + len); z++) *z = 0;
    return (void *)p;
}

#define C8(o) (*(volatile u8 *)(vcommon + (o)))
#define C16(o) (*(volatile u16 *)(vcommon + (o)))
#define C32(o) (*(volatile u32 *)(vcommon + (o)))

struct vdesc { u64 addr; u32 len; u16 flags; u16 next; };
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

#define SLOTS 32
#define REQ_LEN 51
#define RESP_LEN 108
struct slot { u8 *req; u8 *resp; u8 *data; int busy; u64 tag; };
struct vq {
    u16 index, size, avail_idx, last_used;
    volatile struct vdesc *desc;
    volatile u16 *avail;
    volatile u8 *used;
    volatile u16 *notify;
    struct slot slots[SLOTS];
    u64 data_len;
};
static struct vq queues[MAX_CPUS];
static u32 num_req_queues, max_lun, lun_ids[64];
static u64 scsi_bs, scsi_qd;
/* The event queue (queue 1), set up only when hotplug is wanted and offered. */
#define EVQ_SIZE 8
static int want_hotplug, hotplug_on;
/* VIRTIO_RING_F_EVENT_IDX negotiated: notify only when the device's
 * avail_event asks for it (as Linux's virtqueue_kick_prepare does). */
static int event_idx_on;
static struct { u16 size, avail_idx, last_used; volatile struct vdesc *desc; volatile u16 *avail; volatile u8 *used; volatile u16 *notify; u8 *buf; } evq;

static int virtio_scsi_init(u32 nq_want, u64 bs) {
    u32 dev = 0;
    for (dev = 0; dev < 32; dev++)
        if (pci_rd(dev, 0) == 0x10481af4) break;
    if (dev == 32) { printk("ringvm-guest: no virtio-scsi device\n"); return -1; }
    pci_wr(dev, 0x04, pci_rd(dev, 0x04) | 0x6); /* memory space + bus master */
    for (u32 cap = pci_rd(dev, 0x34) & 0xff; cap; cap = (pci_rd(dev, cap) >> 8) & 0xff) {
        u32 h = pci_rd(dev, cap);
        if ((h & 0xff) != 0x09) continue;
        u32 type = (h >> 24) & 0xff, bidx = pci_rd(dev, cap + 4) & 0xff, off = pci_rd(dev, cap + 8);
        if (bidx > 5) continue;
        u32 lo = pci_rd(dev, 0x10 + 4 * bidx);
        u64 bar = lo & ~0xfULL;
        if ((lo & 0x6) == 0x4) bar |= (u64)pci_rd(dev, 0x14 + 4 * bidx) << 32;
        if (bar == 0 || bar >= (64ULL << 30)) {
            /* Firmware put the BAR above what this guest maps: move it into
             * the 32-bit hole, as an OS assigning resources would. */
            u64 nb = 0xd0000000ULL + (u64)bidx * 0x1000000;
            pci_wr(dev, 0x04, pci_rd(dev, 0x04) & ~0x2u);
            pci_wr(dev, 0x10 + 4 * bidx, (u32)nb);
            if ((lo & 0x6) == 0x4) pci_wr(dev, 0x14 + 4 * bidx, 0);
            pci_wr(dev, 0x04, pci_rd(dev, 0x04) | 0x6);
            bar = nb;
        }
        if (type == 1) vcommon = (u8 *)(bar + off);
        if (type == 2) { vnotify = (u8 *)(bar + off); notify_mult = pci_rd(dev, cap + 16); }
        if (type == 4) vdevcfg = (u8 *)(bar + off);
    }
    if (!vcommon || !vnotify || !vdevcfg) { printk("ringvm-guest: virtio caps missing\n"); return -1; }
    C8(0x14) = 0; while (C8(0x14)) cpu_relax();
    C8(0x14) = 1; C8(0x14) = 1 | 2;
    C32(0x00) = 1; u32 fhi = C32(0x04);
    if (!(fhi & 1)) { printk("ringvm-guest: device lacks VERSION_1\n"); return -1; }
    C32(0x00) = 0; u32 flo = C32(0x04);
    hotplug_on = want_hotplug && (flo & 2);
    event_idx_on = (flo >> 29) & 1;
    C32(0x08) = 0; C32(0x0c) = (flo & (1u << 29)) | (hotplug_on ? 2u : 0); /* EVENT_IDX if offered; HOTPLUG if wanted */
    C32(0x08) = 1; C32(0x0c) = 1;                /* VERSION_1 */
    C8(0x14) = 1 | 2 | 8;
    if (!(C8(0x14) & 8)) { printk("ringvm-guest: FEATURES_OK refused\n"); return -1; }
    u32 dev_nq = *(volatile u32 *)(vdevcfg + 0);
    num_req_queues = nq_want < dev_nq ? nq_want : dev_nq;
    for (u32 q = 0; q < num_req_queues; q++) {
        struct vq *v = &queues[q];
        v->index = (u16)(2 + q);
        C16(0x16) = v->index;
        u16 max = C16(0x18);
        v->size = max < 128 ? max : 128;
        C16(0x18) = v->size;
        v->desc = alloc(16ULL * v->size, 4096);
        v->avail = alloc(6 + 2ULL * v->size, 4096);
        v->used = alloc(6 + 8ULL * v->size, 4096);
        *(volatile u64 *)(vcommon + 0x20) = (u64)v->desc;
        *(volatile u64 *)(vcommon + 0x28) = (u64)v->avail;
        *(volatile u64 *)(vcommon + 0x30) = (u64)v->used;
        C16(0x1a) = 0xffff; /* no MSI-X vector: we poll */
        v->notify = (volatile u16 *)(vnotify + (u64)C16(0x1e) * notify_mult);
        C16(0x1c) = 1;
        v->data_len = bs;
        for (int s = 0; s < SLOTS; s++) {
            v->slots[s].req = alloc(64, 64);
            v->slots[s].resp = alloc(128, 64);
            v->slots[s].data = alloc(bs, 4096);
        }
    }
    if (hotplug_on) {
        C16(0x16) = 1;
        u16 max = C16(0x18);
        evq.size = max < EVQ_SIZE ? max : EVQ_SIZE;
        C16(0x18) = evq.size;
        evq.desc = alloc(16ULL * evq.size, 4096);
        evq.avail = alloc(6 + 2ULL * evq.size, 4096);
        evq.used = alloc(6 + 8ULL * evq.size, 4096);
        evq.buf = alloc(16ULL * evq.size, 64);
        *(volatile u64 *)(vcommon + 0x20) = (u64)evq.desc;
        *(volatile u64 *)(vcommon + 0x28) = (u64)evq.avail;
        *(volatile u64 *)(vcommon + 0x30) = (u64)evq.used;
        C16(0x1a) = 0xffff;
        evq.notify = (volatile u16 *)(vnotify + (u64)C16(0x1e) * notify_mult);
        C16(0x1c) = 1;
        for (u16 i = 0; i < evq.size; i++) {
            evq.desc[i].addr = (u64)(evq.buf + 16 * i); evq.desc[i].len = 16; evq.desc[i].flags = VRING_DESC_F_WRITE; evq.desc[i].next = 0;
            evq.avail[2 + i] = i;
        }
        evq.avail_idx = evq.size;
        mb();
        evq.avail[1] = evq.avail_idx;
    }
    C8(0x14) = 1 | 2 | 8 | 4;
    if (hotplug_on) { mb(); *evq.notify = 1; }
    if (C8(0x14) & 0x40) { printk("ringvm-guest: device needs reset after DRIVER_OK\n"); return -1; }
    return 0;
}

/* Posts slot s: request + response + optional data buffer. */
/* Requests posted and not yet reaped, in memory a reset leaves alone
 * (REBOOT_COUNTER_ADDR + 32): the next boot reports how many a reset found
 * in flight ("reset found N requests in flight"). */
#define INFLIGHT_MAGIC 0x696e666c69676874ULL
static volatile u64 *const inflight_ctr = (volatile u64 *)(REBOOT_COUNTER_ADDR + 32);
static void inflight_report(void) {
    if (inflight_ctr[0] == INFLIGHT_MAGIC && inflight_ctr[1]) printk("ringvm-guest: reset found %u requests in flight\n", inflight_ctr[1]);
    inflight_ctr[1] = 0;
    inflight_ctr[0] = INFLIGHT_MAGIC;
}

static void post(struct vq *v, int s, u32 lun, const u8 *cdb, u32 cdblen, u64 len, int write) {
    struct slot *sl = &v->slots[s];
    for (int i = 0; i < REQ_LEN; i++) sl->req[i] = 0;
    sl->req[0] = 1; sl->req[1] = 0; sl->req[2] = (u8)(0x40 | (lun >> 8)); sl->req[3] = (u8)lun;
    *(u64 *)(sl->req + 8) = ++sl->tag;
    for (u32 i = 0; i < cdblen; i++) sl->req[19 + i] = cdb[i];
    u16 h = (u16)(s * 3);
    volatile struct vdesc *d = v->desc;
    d[h].addr = (u64)sl->req; d[h].len = REQ_LEN; d[h].flags = VRING_DESC_F_NEXT; d[h].next = h + 1;
    if (write && len) {
        d[h + 1].addr = (u64)sl->data; d[h + 1].len = (u32)len; d[h + 1].flags = VRING_DESC_F_NEXT; d[h + 1].next = h + 2;
        d[h + 2].addr = (u64)sl->resp; d[h + 2].len = RESP_LEN; d[h + 2].flags = VRING_DESC_F_WRITE; d[h + 2].next = 0;
    } else {
        d[h + 1].addr = (u64)sl->resp; d[h + 1].len = RESP_LEN; d[h + 1].flags = VRING_DESC_F_WRITE | (len ? VRING_DESC_F_NEXT : 0); d[h + 1].next = h + 2;
        d[h + 2].addr = (u64)sl->data; d[h + 2].len = (u32)len; d[h + 2].flags = VRING_DESC_F_WRITE; d[h + 2].next = 0;
    }
    sl->busy = 1;
    __atomic_add_fetch(&inflight_ctr[1], 1, __ATOMIC_SEQ_CST);
    u16 old = v->avail_idx;
    v->avail[2 + (v->avail_idx % v->size)] = h;
    mb();
    v->avail[1] = ++v->avail_idx;
    mb();
    if (!event_idx_on) {
        if (!(*(volatile u16 *)v->used & 1)) *v->notify = v->index; /* VRING_USED_F_NO_NOTIFY */
        return;
    }
    /* vring_need_event(avail_event, new, old) */
    u16 event = *(volatile u16 *)(v->used + 4 + 8 * v->size);
    if ((u16)(v->avail_idx - event - 1) < (u16)(v->avail_idx - old)) *v->notify = v->index;
}

/* Reaps one completion; returns its slot or -1 if none is ready. */
static int reap(struct vq *v) {
    mb();
    if (*(volatile u16 *)(v->used + 2) == v->last_used) return -1;
    volatile u32 *e = (volatile u32 *)(v->used + 4 + 8 * (v->last_used % v->size));
    u32 id = e[0];
    v->last_used++;
    /* Tell the device where we are (EVENT_IDX used_event). */
    v->avail[2 + v->size] = v->last_used;
    int s = (int)(id / 3);
    if (id % 3 || s >= SLOTS || !v->slots[s].busy) { printk("ringvm-guest: bogus used id %u\n", (u64)id); guest_exit(3); }
    v->slots[s].busy = 0;
    __atomic_sub_fetch(&inflight_ctr[1], 1, __ATOMIC_SEQ_CST);
    return s;
}

static int wait_slot(struct vq *v) {
    u64 t0 = rdtsc();
    for (;;) {
        int s = reap(v);
        if (s >= 0) return s;
        if (rdtsc() - t0 > tsc_khz * 30000ULL) { printk("ringvm-guest: request timed out\n"); guest_exit(3); }
        cpu_relax();
    }
}

/* response: 0 ok; status; sense key/asc in *key, *asc */
static int resp_status(struct slot *sl, u8 *key, u8 *asc) {
    u8 response = sl->resp[11], status = sl->resp[10];
    *key = sl->resp[12 + 2] & 0xf; *asc = sl->resp[12 + 12];
    if (response) return 0x100 | response;
    return status;
}

static int scsi_sync(struct vq *v, u32 lun, const u8 *cdb, u32 cdblen, u64 len, int write, u8 *key, u8 *asc) {
    post(v, 0, lun, cdb, cdblen, len, write);
    int s = wait_slot(v);
    return resp_status(&v->slots[s], key, asc);
}

static void cdb_rw16(u8 *c, int write, u64 lba, u32 blocks) {
    for (int i = 0; i < 16; i++) c[i] = 0;
    c[0] = write ? 0x8a : 0x88;
    for (int i = 0; i < 8; i++) c[2 + i] = (u8)(lba >> (56 - 8 * i));
    for (int i = 0; i < 4; i++) c[10 + i] = (u8)(blocks >> (24 - 8 * i));
}

/* Clears unit attentions (a real target reports power-on first), then
 * lists the LUNs with REPORT LUNS; max_lun becomes the count - 1. */
static int discover_luns(struct vq *v) {
    u8 tur[6] = {0}, key, asc;
    for (int i = 0; i < 8; i++) {
        int st = scsi_sync(v, 0, tur, 6, 0, 0, &key, &asc);
        if (st == 0) break;
        if (st != 2 || key != 6) { printk("ringvm-guest: TEST UNIT READY: status %x key %x\n", (u64)st, (u64)key); return -1; }
    }
    u8 rl[12] = {0xa0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0};
    if (scsi_sync(v, 0, rl, 12, 512, 0, &key, &asc)) { printk("ringvm-guest: REPORT LUNS failed\n"); return -1; }
    u8 *d = v->slots[0].data;
    u32 n = ((u32)d[0] << 24 | (u32)d[1] << 16 | (u32)d[2] << 8 | d[3]) / 8;
    if (n == 0) return -1;
    if (n > 64) n = 64;
    for (u32 i = 0; i < n; i++) lun_ids[i] = ((u32)(d[8 + 8 * i] & 0x3f) << 8) | d[9 + 8 * i];
    max_lun = n - 1;
    for (u32 i = 0; i < n; i++) {
        for (int k = 0; k < 8; k++) if (scsi_sync(v, lun_ids[i], tur, 6, 0, 0, &key, &asc) == 0) break;
    }
    return 0;
}

static u64 capacity_blocks(struct vq *v, u32 lun) {
    u8 c[16] = {0x9e, 0x10}, key, asc;
    c[13] = 32;
    if (scsi_sync(v, lun, c, 16, 32, 0, &key, &asc)) return 0;
    u8 *d = v->slots[0].data;
    u64 last = 0;
    for (int i = 0; i < 8; i++) last = last << 8 | d[i];
    return last + 1;
}

/* The pattern word at byte `off` of LUN `lun` (the host test computes the same). */
static u64 pattern(u64 seed, u32 lun, u64 off) {
    u64 x = (off / 8 + 1) ^ (seed << 40) ^ ((u64)lun << 56);
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
    return x;
}

static u64 scsi_seed, scsi_bytes_per_lun, scsi_passes = 1;
/* reboots=N: CPU 0 resets the machine (i8042) this TSC value into the I/O,
 * with requests in flight, N times over (counted across resets). */
static u64 scsi_reboots, scsi_reboot_at;
static volatile u64 scsi_bad, scsi_done_cpus, scsi_phase;

/* Writes (phase 0) or verifies (phase 1) this CPU's chunks on every LUN. */
static void scsi_verify_cpu(u32 cpu) {
    struct vq *v = &queues[cpu % num_req_queues];
    if (cpu >= num_req_queues) return;
    u64 bs = scsi_bs, nchunks = scsi_bytes_per_lun / bs;
    for (u64 phase = 0; phase < 1 + scsi_passes; phase++) {
        for (u32 lun = 0; lun <= max_lun; lun++) {
            u64 next = cpu, inflight = 0; u64 chunk_of[SLOTS];
            while (next < nchunks || inflight) {
                while (next < nchunks && inflight < scsi_qd) {
                    int s = -1;
                    for (int k = 0; k < SLOTS && k < (int)scsi_qd; k++) if (!v->slots[k].busy) { s = k; break; }
                    if (s < 0) break;
                    u64 off = next * bs;
                    if (phase == 0) { u64 *d = (u64 *)v->slots[s].data; for (u64 i = 0; i < bs / 8; i++) d[i] = pattern(scsi_seed, lun, off + i * 8); }
                    u8 c[16]; cdb_rw16(c, phase == 0, off / 512, (u32)(bs / 512));
                    chunk_of[s] = next;
                    post(v, s, lun_ids[lun], c, 16, bs, phase == 0);
                    inflight++;
                    next += num_req_queues;
                }
                int s = wait_slot(v);
                inflight--;
                if (cpu == 0 && scsi_reboot_at && rdtsc() > scsi_reboot_at) { outb(0x64, 0xfe); for (;;) cpu_relax(); }
                u8 key, asc;
                int st = resp_status(&v->slots[s], &key, &asc);
                if (st) { printk("ringvm-guest: lun %u chunk %u: status %x key %x asc %x\n", (u64)lun, chunk_of[s], (u64)st, (u64)key, (u64)asc); __atomic_add_fetch(&scsi_bad, 1, __ATOMIC_SEQ_CST); continue; }
                if (phase >= 1) {
                    u64 off = chunk_of[s] * bs, *d = (u64 *)v->slots[s].data, bad = 0;
                    for (u64 i = 0; i < bs / 8; i++) if (d[i] != pattern(scsi_seed, lun, off + i * 8)) bad++;
                    if (bad) { printk("ringvm-guest: lun %u chunk %u: %u bad words\n", (u64)lun, chunk_of[s], bad); __atomic_add_fetch(&scsi_bad, 1, __ATOMIC_SEQ_CST); }
                }
            }
        }
        /* Both phases on every CPU before verifying. */
        __atomic_add_fetch(&scsi_done_cpus, 1, __ATOMIC_SEQ_CST);
        while (scsi_done_cpus < (phase + 1) * (ncpus < num_req_queues ? ncpus : num_req_queues)) {
            /* CPU 0 may be done before its reset time while another still has I/O in flight. */
            if (cpu == 0 && scsi_reboot_at && rdtsc() > scsi_reboot_at) { outb(0x64, 0xfe); for (;;) cpu_relax(); }
            cpu_relax();
        }
        if (cpu == 0 && phase >= 1 && scsi_passes > 1) printk("ringvm-guest: scsi-verify pass %u bad=%u\n", phase, (u64)scsi_bad);
    }
}

static u64 bench_pattern; /* 0 randread, 1 read, 2 write */
static volatile u64 bench_ops[MAX_CPUS];

static void scsi_bench_cpu(u32 cpu) {
    if (cpu >= num_req_queues) return;
    struct vq *v = &queues[cpu];
    u64 bs = scsi_bs, blocks = scsi_bytes_per_lun / bs, rng = 0x9E3779B97F4A7C15ULL ^ cpu, seq = cpu, inflight = 0, ops = 0, last_done = 0;
    u64 end = rdtsc() + secs * tsc_khz * 1000ULL;
    while (rdtsc() < end || inflight) {
        while (rdtsc() < end && inflight < scsi_qd) {
            int s = -1;
            for (int k = 0; k < SLOTS && k < (int)scsi_qd; k++) if (!v->slots[k].busy) { s = k; break; }
            if (s < 0) break;
            u64 blk;
            if (bench_pattern == 0) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; blk = rng % blocks; }
            else { blk = seq % blocks; seq += num_req_queues; }
            if (bench_pattern == 2) { u64 *d = (u64 *)v->slots[s].data; for (u64 i = 0; i < bs / 8; i++) d[i] = pattern(scsi_seed, 0, blk * bs + i * 8); }
            u8 c[16]; cdb_rw16(c, bench_pattern == 2, blk * bs / 512, (u32)(bs / 512));
            post(v, s, lun_ids[0], c, 16, bs, bench_pattern == 2);
            inflight++;
            if (!last_done) last_done = rdtsc();
        }
        int s = reap(v);
        if (s < 0) {
            /* A lost request is a failure, not a hang. */
            if (inflight && rdtsc() - last_done > tsc_khz * 30000ULL) { printk("ringvm-guest: bench request timed out (%u in flight)\n", inflight); guest_exit(3); }
            cpu_relax();
            continue;
        }
        last_done = rdtsc();
        inflight--;
        u8 key, asc;
        if (resp_status(&v->slots[s], &key, &asc)) { printk("ringvm-guest: bench I/O failed key %x asc %x\n", (u64)key, (u64)asc); guest_exit(1); }
        ops++;
    }
    bench_ops[cpu] = ops;
}

/* The disk's file fails every read and write on the host (EIO): each
 * gets MEDIUM ERROR (unrecovered read error / write error), and the LUN
 * keeps answering the commands that do not touch the file. */
static int scsi_eio(void) {
    struct vq *v = &queues[0];
    u32 id = lun_ids[0];
    u8 c[16], key, asc;
    int ok = 1;
    for (int round = 0; round < 3; round++) {
        cdb_rw16(c, 0, 8, 8);
        int st = scsi_sync(v, id, c, 16, 4096, 0, &key, &asc);
        printk("ringvm-guest: scsi-eio read: status %x key %x asc %x\n", (u64)st, (u64)key, (u64)asc);
        if (st != 2 || key != 3 || asc != 0x11) ok = 0;
        cdb_rw16(c, 1, 8, 8);
        st = scsi_sync(v, id, c, 16, 4096, 1, &key, &asc);
        printk("ringvm-guest: scsi-eio write: status %x key %x asc %x\n", (u64)st, (u64)key, (u64)asc);
        if (st != 2 || key != 3 || asc != 0x0c) ok = 0;
        u8 tur[6] = {0};
        st = scsi_sync(v, id, tur, 6, 0, 0, &key, &asc);
        if (st != 0) { printk("ringvm-guest: scsi-eio TEST UNIT READY: status %x key %x\n", (u64)st, (u64)key); ok = 0; }
        if (capacity_blocks(v, id) == 0) { printk("ringvm-guest: scsi-eio READ CAPACITY failed\n"); ok = 0; }
    }
    return ok;
}

static int scsi_errors(void) {
    struct vq *v = &queues[0];
    int ok = 1;
    for (u32 lun = 0; lun <= max_lun; lun++) {
        u32 id = lun_ids[lun];
        u64 cap = capacity_blocks(v, id);
        u8 c[16], key, asc;
        cdb_rw16(c, 0, cap, 1);
        int st = scsi_sync(v, id, c, 16, 512, 0, &key, &asc);
        printk("ringvm-guest: lun %u read past end: status %x key %x asc %x\n", (u64)lun, (u64)st, (u64)key, (u64)asc);
        if (st != 2 || key != 5 || asc != 0x21) ok = 0;
        u8 ms[6] = {0x1a, 0x08, 0x3f, 0, 64, 0};
        scsi_sync(v, id, ms, 6, 64, 0, &key, &asc);
        int wp = (v->slots[0].data[2] & 0x80) != 0;
        cdb_rw16(c, 1, 0, 1);
        st = scsi_sync(v, id, c, 16, 512, 1, &key, &asc);
        printk("ringvm-guest: lun %u wp=%u write: status %x key %x asc %x\n", (u64)lun, (u64)wp, (u64)st, (u64)key, (u64)asc);
        if (wp && (st != 2 || key != 7 || asc != 0x27)) ok = 0;
        if (!wp && st != 0) ok = 0;
        u8 bad[6] = {0xc5, 0, 0, 0, 0, 0}; /* reserved opcode group 6: vendor specific */
        st = scsi_sync(v, id, bad, 6, 0, 0, &key, &asc);
        if (st != 2 || key != 5 || asc != 0x20) { printk("ringvm-guest: lun %u bad opcode: status %x key %x asc %x\n", (u64)lun, (u64)st, (u64)key, (u64)asc); ok = 0; }
    }
    /* A LUN that does not exist: INQUIRY says so. */
    u8 inq[6] = {0x12, 0, 0, 0, 36, 0}, key, asc;
    int st = scsi_sync(v, lun_ids[max_lun] + 1, inq, 6, 36, 0, &key, &asc);
    if (st != 0 || v->slots[0].data[0] != 0x7f) { printk("ringvm-guest: missing lun inquiry: status %x pq %x\n", (u64)st, (u64)v->slots[0].data[0]); ok = 0; }
    return ok;
}

/* One event from the event queue, if the device has reported one; its
 * buffer goes straight back to the device. */
static int evq_poll(u32 *event, u32 *lun, u32 *reason) {
    mb();
    if (*(volatile u16 *)(evq.used + 2) == evq.last_used) return 0;
    volatile u32 *e = (volatile u32 *)(evq.used + 4 + 8 * (evq.last_used % evq.size));
    u32 id = e[0], len = e[1];
    evq.last_used++;
    if (id >= evq.size || len < 16) { printk("ringvm-guest: bad event entry id %u len %u\n", (u64)id, (u64)len); guest_exit(3); }
    u8 *b = evq.buf + 16 * id;
    *event = (u32)b[0] | (u32)b[1] << 8 | (u32)b[2] << 16 | (u32)b[3] << 24;
    *lun = b[4] == 1 ? ((u32)(b[6] & 0x3f) << 8 | b[7]) : 0xffffffffu;
    *reason = (u32)b[12] | (u32)b[13] << 8 | (u32)b[14] << 16 | (u32)b[15] << 24;
    evq.avail[2 + evq.avail_idx % evq.size] = (u16)id;
    mb();
    evq.avail[1] = ++evq.avail_idx;
    mb();
    *evq.notify = 1;
    return 1;
}

/* Reads the last LUN (QD1) until the device says it was removed; then the
 * LUN must be gone (reads refused with LOGICAL UNIT NOT SUPPORTED, INQUIRY
 * without a unit, not in REPORT LUNS) and the first LUN still served. */
static int scsi_unplug(void) {
    if (!hotplug_on) { printk("ringvm-guest: scsi-unplug: the device does not offer HOTPLUG\n"); return 0; }
    if (max_lun < 1) { printk("ringvm-guest: scsi-unplug needs 2 LUNs\n"); return 0; }
    struct vq *v = &queues[0];
    u32 victim = lun_ids[max_lun], before = max_lun + 1, ev = 0, evlun = 0, reason = 0;
    u64 reads = 0, refused = 0, t0 = rdtsc(), limit = (secs ? secs : 60) * tsc_khz * 1000ULL;
    u8 c[16], key, asc;
    printk("ringvm-guest: scsi-unplug ready luns=%u watching lun %u\n", (u64)before, (u64)victim);
    for (;;) {
        if (evq_poll(&ev, &evlun, &reason)) break;
        if (rdtsc() - t0 > limit) { printk("ringvm-guest: scsi-unplug: no event after %u reads\n", reads); return 0; }
        cdb_rw16(c, 0, (reads % 64) * 8, 8);
        int st = scsi_sync(v, victim, c, 16, 4096, 0, &key, &asc);
        if (st == 0) { if (++reads == 1) printk("ringvm-guest: scsi-unplug reading lun %u\n", (u64)victim); }
        else if (st == 2 && key == 5 && asc == 0x25) refused++;
        else { printk("ringvm-guest: scsi-unplug: read status %x key %x asc %x\n", (u64)st, (u64)key, (u64)asc); return 0; }
    }
    printk("ringvm-guest: scsi-unplug event=%x lun=%u reason=%u reads=%u refused=%u\n", (u64)ev, (u64)evlun, (u64)reason, reads, refused);
    int ok = (ev & 0x7fffffffu) == 1 && reason == 2 && evlun == victim;
    cdb_rw16(c, 0, 0, 8);
    int st = scsi_sync(v, victim, c, 16, 4096, 0, &key, &asc);
    if (st != 2 || key != 5 || asc != 0x25) { printk("ringvm-guest: scsi-unplug: read after removal: status %x key %x asc %x\n", (u64)st, (u64)key, (u64)asc); ok = 0; }
    u8 inq[6] = {0x12, 0, 0, 0, 36, 0};
    st = scsi_sync(v, victim, inq, 6, 36, 0, &key, &asc);
    if (st != 0 || v->slots[0].data[0] != 0x7f) { printk("ringvm-guest: scsi-unplug: inquiry: status %x pq %x\n", (u64)st, (u64)v->slots[0].data[0]); ok = 0; }
    u8 rl[12] = {0xa0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0};
    st = scsi_sync(v, lun_ids[0], rl, 12, 512, 0, &key, &asc);
    u8 *d = v->slots[0].data;
    u32 n = ((u32)d[0] << 24 | (u32)d[1] << 16 | (u32)d[2] << 8 | d[3]) / 8;
    for (u32 i = 0; i < n && i < 64; i++) if ((((u32)(d[8 + 8 * i] & 0x3f) << 8) | d[9 + 8 * i]) == victim) ok = 0;
    if (st || n != before - 1) { printk("ringvm-guest: scsi-unplug: report luns: status %x luns %u\n", (u64)st, (u64)n); ok = 0; }
    cdb_rw16(c, 0, 0, 8);
    st = scsi_sync(v, lun_ids[0], c, 16, 4096, 0, &key, &asc);
    if (st) { printk("ringvm-guest: scsi-unplug: lun %u read: status %x\n", (u64)lun_ids[0], (u64)st); ok = 0; }
    return ok;
}

/* work=scsi-unplug-restore: waits for LUN 0's removal (the host's
 * device_del), then for 'c' on the serial port (typed into the restored
 * VM of a snapshot taken meanwhile), then checks that REPORT LUNS lists
 * LUN 1 alone and that LUN 1's first `mib` MiB hold pattern(seed, 1, off)
 * (the host wrote them). */
static int scsi_unplug_restore(void) {
    if (!hotplug_on || max_lun != 1) { printk("ringvm-guest: scsi-unplug-restore needs HOTPLUG and 2 LUNs\n"); return 0; }
    struct vq *v = &queues[0];
    u32 victim = lun_ids[0], keep = lun_ids[1], ev = 0, evlun = 0, reason = 0;
    u64 t0 = rdtsc(), limit = 600 * tsc_khz * 1000ULL;
    u8 c[16], key, asc;
    printk("ringvm-guest: scsi-unplug-restore ready, watching lun %u\n", (u64)victim);
    while (!evq_poll(&ev, &evlun, &reason)) {
        if (rdtsc() - t0 > limit) { printk("ringvm-guest: scsi-unplug-restore: no event\n"); return 0; }
        cpu_relax();
    }
    if ((ev & 0x7fffffffu) != 1 || reason != 2 || evlun != victim) { printk("ringvm-guest: scsi-unplug-restore: event %x lun %u reason %u\n", (u64)ev, (u64)evlun, (u64)reason); return 0; }
    printk("ringvm-guest: scsi-unplug-restore removed lun %u; waiting for 'c'\n", (u64)victim);
    t0 = rdtsc();
    while (serial_rx() != 'c') {
        if (rdtsc() - t0 > limit) { printk("ringvm-guest: scsi-unplug-restore: no 'c'\n"); return 0; }
        cpu_relax();
    }
    int ok = 1;
    u8 rl[12] = {0xa0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0};
    int st = scsi_sync(v, keep, rl, 12, 512, 0, &key, &asc);
    u8 *d = v->slots[0].data;
    u32 n = ((u32)d[0] << 24 | (u32)d[1] << 16 | (u32)d[2] << 8 | d[3]) / 8;
    u32 first = n ? (((u32)(d[8] & 0x3f) << 8) | d[9]) : 0xffff;
    if (st || n != 1 || first != keep) { printk("ringvm-guest: scsi-unplug-restore: report luns status %x count %u first %u\n", (u64)st, (u64)n, (u64)first); ok = 0; }
    u64 bad = 0, bs = scsi_bs;
    for (u64 off = 0; off + bs <= scsi_bytes_per_lun; off += bs) {
        cdb_rw16(c, 0, off / 512, (u32)(bs / 512));
        st = scsi_sync(v, keep, c, 16, bs, 0, &key, &asc);
        if (st) { printk("ringvm-guest: scsi-unplug-restore: read at %u: status %x key %x asc %x\n", off, (u64)st, (u64)key, (u64)asc); return 0; }
        u64 *w = (u64 *)v->slots[0].data;
        for (u64 i = 0; i < bs / 8; i++) if (w[i] != pattern(scsi_seed, 1, off + i * 8)) bad++;
    }
    printk("ringvm-guest: scsi-unplug-restore luns=%u lun%u bytes=%u bad=%u\n", (u64)n, (u64)keep, scsi_bytes_per_lun, bad);
    return ok && !bad;
}
