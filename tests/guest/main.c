/*
 * ringvm test guest: workloads, all at CPL3 with IOPL=3 and interrupts off.
 *
 * Command line (key=value, space separated; see README.md):
 *   work=mem|verify|spin|hello|reboot  count=N  mib=N  rate=MiBps  secs=N|inf  seed=N
 *   beat=MS (mem: cpu0 prints a heartbeat line every MS ms while dirtying)
 *   workers=N (mem: only the first N cpus dirty; the others count spins,
 *   which the heartbeat line reports as spins=N: their speed)
 *   work=scsi-verify|scsi-errors|scsi-eio|scsi-bench|scsi-unplug: see scsi.c
 * Reports on COM1 (0x3f8) and ends through the isa-debug-exit port (0x501):
 *   0 = pass, 1 = verification failed, 2 = bad command line, 3 = internal error.
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define COM1 0x3f8
#define DEBUG_EXIT 0x501
#define PAGE 4096ULL
#define MIB (1ULL << 20)
#define MAX_CPUS 64
#define MAX_RANGES 16
#define REGION_START (16 * MIB)
#define PAGE_MAGIC 0x52696e67564d5047ULL /* "RingVMPG" */

extern u32 start_info_paddr;
extern u32 next_cpu;
extern char ap_tramp[], ap_tramp_end[];
extern char __bss_start[], __bss_end[];

/* Survives resets (outside the image, below the EBDA, not in any table). */
#define REBOOT_COUNTER_ADDR 0x7f000ULL
#define REBOOT_MAGIC 0x7265626f6f74ULL

static inline void outb(u16 p, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(p)); }
static inline u8 inb(u16 p) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d) {
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

/* ---------------------------------------------------------------- serial */
static volatile u32 print_lock;
static void lock(volatile u32 *l) { while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE)) cpu_relax(); }
static void unlock(volatile u32 *l) { __atomic_store_n(l, 0, __ATOMIC_RELEASE); }

static void putc_raw(char c) {
    for (int i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++) cpu_relax();
    outb(COM1, (u8)c);
}
static void puts_raw(const char *s) { while (*s) { if (*s == '\n') putc_raw('\r'); putc_raw(*s++); } }
static void putu(u64 v) {
    char b[24]; int n = 0;
    do { b[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) putc_raw(b[--n]);
}
static void putx(u64 v) {
    puts_raw("0x");
    for (int s = 60; s >= 0; s -= 4) putc_raw("0123456789abcdef"[(v >> s) & 15]);
}
/* tiny printf: %s %u (u64) %x (u64) %d (i64) */
static void printk(const char *fmt, ...) {
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    lock(&print_lock);
    for (; *fmt; fmt++) {
        if (*fmt != '%') { if (*fmt == '\n') putc_raw('\r'); putc_raw(*fmt); continue; }
        switch (*++fmt) {
        case 's': puts_raw(__builtin_va_arg(ap, const char *)); break;
        case 'u': putu(__builtin_va_arg(ap, u64)); break;
        case 'x': putx(__builtin_va_arg(ap, u64)); break;
        case 'd': { i64 v = __builtin_va_arg(ap, i64); if (v < 0) { putc_raw('-'); v = -v; } putu((u64)v); break; }
        default: putc_raw('%'); putc_raw(*fmt);
        }
    }
    unlock(&print_lock);
    __builtin_va_end(ap);
}
static int serial_rx(void) { return (inb(COM1 + 5) & 1) ? inb(COM1) : -1; }

static void __attribute__((noreturn)) guest_exit(u8 code) {
    printk("ringvm-guest: exit %u\n", (u64)code);
    outb(DEBUG_EXIT, code);
    for (;;) cpu_relax();
}

/* ------------------------------------------------------------ start info */
struct hvm_start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
};
struct hvm_memmap_entry { u64 addr, size; u32 type, reserved; };

struct range { u64 start, pages, first_page; };
static struct range ranges[MAX_RANGES];
static int nr_ranges;
static u64 ram_total;

/* ------------------------------------------------------------ cmdline */
static const char *cmdline = "";
static int streq_n(const char *a, const char *b, int n) { for (int i = 0; i < n; i++) if (a[i] != b[i]) return 0; return 1; }
/* Finds key=value; returns pointer to value or 0. */
static const char *param(const char *key) {
    int kl = 0; while (key[kl]) kl++;
    for (const char *p = cmdline; *p;) {
        while (*p == ' ') p++;
        if (streq_n(p, key, kl) && p[kl] == '=') return p + kl + 1;
        while (*p && *p != ' ') p++;
    }
    return 0;
}
static int word_is(const char *v, const char *w) {
    if (!v) return 0;
    while (*w) if (*v++ != *w++) return 0;
    return *v == 0 || *v == ' ';
}
static u64 param_u64(const char *key, u64 def, int *bad) {
    const char *v = param(key);
    if (!v) return def;
    if (word_is(v, "inf")) return ~0ULL;
    u64 r = 0; int n = 0;
    while (*v >= '0' && *v <= '9') { r = r * 10 + (u64)(*v++ - '0'); n++; }
    if (!n || (*v && *v != ' ')) { *bad = 1; printk("ringvm-guest: bad value for %s\n", key); }
    return r;
}

/* ------------------------------------------------------------ CPU count */
static u32 count_cpus_mptable(void) {
    for (u64 a = 0xF0000; a < 0x100000; a += 16) {
        const u8 *p = (const u8 *)a;
        if (p[0] != '_' || p[1] != 'M' || p[2] != 'P' || p[3] != '_') continue;
        u32 cfg = *(const u32 *)(p + 4);
        if (!cfg) return 0;
        const u8 *c = (const u8 *)(u64)cfg;
        if (c[0] != 'P' || c[1] != 'C' || c[2] != 'M' || c[3] != 'P') return 0;
        u16 count = *(const u16 *)(c + 34);
        const u8 *e = c + 44;
        u32 n = 0;
        for (u16 i = 0; i < count; i++) {
            if (e[0] == 0) { if (e[3] & 1) n++; e += 20; } else e += 8;
        }
        return n;
    }
    return 0;
}
static u32 count_cpus_acpi(u64 rsdp) {
    if (!rsdp) return 0;
    const u8 *r = (const u8 *)rsdp;
    if (!streq_n((const char *)r, "RSD PTR ", 8)) return 0;
    u64 sdt; int xsdt = r[15] >= 2 && *(const u64 *)(r + 24);
    sdt = xsdt ? *(const u64 *)(r + 24) : *(const u32 *)(r + 16);
    const u8 *s = (const u8 *)sdt;
    u32 len = *(const u32 *)(s + 4), esz = xsdt ? 8 : 4;
    for (u32 off = 36; off + esz <= len; off += esz) {
        const u8 *t = (const u8 *)(xsdt ? *(const u64 *)(s + off) : (u64) * (const u32 *)(s + off));
        if (!streq_n((const char *)t, "APIC", 4)) continue;
        u32 tl = *(const u32 *)(t + 4), n = 0;
        for (u32 o = 44; o + 2 <= tl && t[o + 1]; o += t[o + 1])
            if (t[o] == 0 && (*(const u32 *)(t + o + 4) & 1)) n++;
        return n;
    }
    return 0;
}

/* The RSDP where firmware leaves it when the boot protocol names none (ACPI
 * 5.2.5.1: the first KiB of the EBDA, then 0xE0000-0xFFFFF, 16-byte aligned,
 * checksummed). */
static u64 find_rsdp(void) {
    volatile u64 bda_ebda = 0x40e; /* through a variable: GCC rejects a constant address */
    u64 ebda = (u64)(*(const volatile u16 *)bda_ebda) << 4;
    u64 areas[2][2] = {{ebda, ebda + 1024}, {0xE0000, 0x100000}};
    for (int k = 0; k < 2; k++) {
        if (k == 0 && (ebda < 0x80000 || ebda >= 0xA0000)) continue;
        for (u64 a = areas[k][0]; a + 20 <= areas[k][1]; a += 16) {
            const u8 *p = (const u8 *)a;
            if (!streq_n((const char *)p, "RSD PTR ", 8)) continue;
            u8 sum = 0;
            for (int i = 0; i < 20; i++) sum += p[i];
            if (!sum) return a;
        }
    }
    return 0;
}

/* ------------------------------------------------------------ timing */
static u64 tsc_khz;
static void calibrate_tsc(void) {
    /* PIT channel 2, gate on, speaker off; mode 0 count of 10 ms. */
    const u32 latch = 1193182 / 100;
    outb(0x61, (u8)((inb(0x61) & ~0x02) | 0x01));
    outb(0x43, 0xb0);
    outb(0x42, latch & 0xff);
    outb(0x42, latch >> 8);
    u64 t0 = rdtsc(), t1 = t0;
    u64 spins = 0;
    while (!(inb(0x61) & 0x20) && ++spins < 100000000ULL) t1 = rdtsc();
    if (spins < 100000000ULL && t1 > t0) { tsc_khz = (t1 - t0) / 10; return; }
    u32 a, b, c, d;
    cpuid(0x40000000, &a, &b, &c, &d);
    if (a >= 0x40000010) { cpuid(0x40000010, &a, &b, &c, &d); if (a) { tsc_khz = a; return; } }
    tsc_khz = 2000000; /* last resort: assume 2 GHz */
}
static u64 ms_since(u64 t0) { return (rdtsc() - t0) / tsc_khz; }

/* ------------------------------------------------------------ memory test */
static u64 nr_pages, region_seed;
static u32 *gen_table;               /* one generation per page */
static u32 ncpus = 1;
static volatile u32 cpus_online = 1, go_flag, stop_flag, done_count, verified_count;
static volatile u64 bad_pages, pages_rewritten;
static u64 rate_mibps, secs, t_start, beat_ms, workers;
static volatile u64 idle_spins;
static int work_kind; /* 1 mem, 2 verify, 3 spin, 4 hello */

static inline u64 *page_addr(u64 i) {
    for (int r = 0; r < nr_ranges; r++)
        if (i < ranges[r].first_page + ranges[r].pages)
            return (u64 *)(ranges[r].start + (i - ranges[r].first_page) * PAGE);
    return 0;
}
static inline u64 mix(u64 i, u64 gen) {
    u64 x = (i + 1) * 0x9E3779B97F4A7C15ULL ^ (gen + region_seed) * 0xBF58476D1CE4E5B9ULL;
    return x ? x : 1;
}
static void write_page(u64 i, u32 gen) {
    u64 *p = page_addr(i), x = mix(i, gen);
    for (int w = 2; w < 512; w++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; p[w] = x; }
    p[1] = gen;
    p[0] = PAGE_MAGIC ^ i;
    gen_table[i] = gen;
}
static int check_page(u64 i) {
    u64 *p = page_addr(i);
    u32 gen = gen_table[i];
    if (p[0] != (PAGE_MAGIC ^ i) || p[1] != gen) return 0;
    u64 x = mix(i, gen);
    for (int w = 2; w < 512; w++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; if (p[w] != x) return 0; }
    return 1;
}

static void cpu_slice(u32 cpu, u64 *lo, u64 *hi) { *lo = nr_pages * cpu / ncpus; *hi = nr_pages * (cpu + 1) / ncpus; }

static void do_verify(u32 cpu) {
    u64 lo, hi, bad = 0, first_bad = ~0ULL;
    cpu_slice(cpu, &lo, &hi);
    for (u64 i = lo; i < hi; i++) if (!check_page(i)) { if (!bad) first_bad = i; bad++; }
    if (bad) {
        printk("ringvm-guest: cpu%u: %u bad pages, first %u at %x\n", (u64)cpu, bad, first_bad, (u64)page_addr(first_bad));
        __atomic_add_fetch(&bad_pages, bad, __ATOMIC_SEQ_CST);
    }
}

static void do_mem(u32 cpu) {
    u64 lo, hi;
    cpu_slice(cpu, &lo, &hi);
    for (u64 i = lo; i < hi; i++) write_page(i, 1);
    __atomic_add_fetch(&done_count, 1, __ATOMIC_SEQ_CST);
    while (done_count < ncpus) cpu_relax();
    if (cpu == 0) printk("ringvm-guest: fill done pages=%u ms=%u\n", nr_pages, ms_since(t_start));
    /* Dirty phase: rewrite pages round-robin at rate/ncpus MiB/s. */
    u64 t0 = rdtsc(), n = 0, i = lo, last_poll = t0, last_beat = t0, beats = 0;
    u64 tsc_per_page = rate_mibps ? (tsc_khz * 1000ULL * PAGE * ncpus) / (rate_mibps * MIB) : 0;
    u64 end_tsc = secs == ~0ULL ? ~0ULL : t0 + secs * tsc_khz * 1000ULL;
    if (hi > lo) while (!stop_flag) {
        u64 now = rdtsc();
        if (now >= end_tsc) break;
        if (cpu == 0 && now - last_poll > tsc_khz * 10) {
            last_poll = now;
            int c = serial_rx();
            if (c == 'v' || c == 'q') { printk("ringvm-guest: stop requested\n"); stop_flag = 1; break; }
        }
        if (cpu == 0 && beat_ms && now - last_beat > beat_ms * tsc_khz) {
            last_beat = now;
            if (workers) printk("ringvm-guest: beat %u pages=%u spins=%u\n", ++beats, n, idle_spins);
            else printk("ringvm-guest: beat %u pages=%u\n", ++beats, n);
        }
        if (tsc_per_page && now - t0 < n * tsc_per_page) { cpu_relax(); continue; }
        write_page(i, gen_table[i] + 1);
        n++;
        if (++i == hi) i = lo;
    }
    __atomic_add_fetch(&pages_rewritten, n, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&done_count, 1, __ATOMIC_SEQ_CST);
    while (done_count < 2 * ncpus) cpu_relax();
    if (cpu == 0) {
        u64 ms = ms_since(t0);
        printk("ringvm-guest: dirty done pages=%u ms=%u\n", pages_rewritten, ms);
    }
}

#include "scsi.c"

static void run_work(u32 cpu) {
    if (work_kind == 6) scsi_verify_cpu(cpu);
    if (work_kind == 8) scsi_bench_cpu(cpu);
    if (work_kind >= 6) { __atomic_add_fetch(&verified_count, 1, __ATOMIC_SEQ_CST); return; }
    if (work_kind == 1) do_mem(cpu);
    if (work_kind == 1 || work_kind == 2) {
        do_verify(cpu);
        __atomic_add_fetch(&verified_count, 1, __ATOMIC_SEQ_CST);
    }
    if (work_kind == 3) for (;;) {
        if (cpu == 0) { int c = serial_rx(); if (c == 'q') guest_exit(0); }
        for (volatile int k = 0; k < 100000; k++) {}
    }
}

void guest_main(u32 cpu) {
    if (cpu != 0) {
        __atomic_add_fetch(&cpus_online, 1, __ATOMIC_SEQ_CST);
        while (!go_flag) cpu_relax();
        if (cpu < ncpus) run_work(cpu);
        else if (work_kind == 1) for (;;) { idle_spins++; cpu_relax(); }
        for (;;) cpu_relax();
    }
    /* Nothing zeroes .bss on a reset; do it like any kernel would. */
    for (volatile char *p = __bss_start; p < __bss_end; p++) *p = 0;
    ncpus = 1;
    cpus_online = 1;
    t_start = rdtsc();
    const struct hvm_start_info *si = (const struct hvm_start_info *)(u64)start_info_paddr;
    if (!si || si->magic != 0x336ec578) { puts_raw("ringvm-guest: no PVH start info\n"); guest_exit(3); }
    if (si->cmdline_paddr) cmdline = (const char *)si->cmdline_paddr;
    const struct hvm_memmap_entry *mm = (const struct hvm_memmap_entry *)si->memmap_paddr;
    for (u32 k = 0; k < si->memmap_entries; k++) {
        if (mm[k].type != 1) continue;
        ram_total += mm[k].size;
        u64 s = mm[k].addr, e = mm[k].addr + mm[k].size;
        if (s < REGION_START) s = REGION_START;
        s = (s + 2 * MIB - 1) & ~(2 * MIB - 1);
        e &= ~(PAGE - 1);
        if (e > 64ULL << 30) e = 64ULL << 30; /* identity map limit */
        if (e <= s || nr_ranges == MAX_RANGES) continue;
        ranges[nr_ranges].start = s;
        ranges[nr_ranges].pages = (e - s) / PAGE;
        ranges[nr_ranges].first_page = nr_ranges ? ranges[nr_ranges - 1].first_page + ranges[nr_ranges - 1].pages : 0;
        nr_ranges++;
    }
    /* ACPI's MADT first: firmware that counts the CPUs it could wake (SeaBIOS
     * under some hypervisors) writes an MP table with fewer than exist. */
    u32 n = count_cpus_acpi(si->rsdp_paddr);
    if (!n) n = count_cpus_acpi(find_rsdp());
    if (!n) n = count_cpus_mptable();
    if (!n) n = 1;
    if (n > MAX_CPUS) n = MAX_CPUS;
    printk("ringvm-guest: start cpus=%u ram=%uMiB cmdline=\"%s\"\n", (u64)n, ram_total / MIB, cmdline);

    int bad = 0;
    const char *w = param("work");
    if (!w || word_is(w, "mem")) work_kind = 1;
    else if (word_is(w, "verify")) work_kind = 2;
    else if (word_is(w, "spin")) work_kind = 3;
    else if (word_is(w, "hello")) work_kind = 4;
    else if (word_is(w, "reboot")) work_kind = 5;
    else if (word_is(w, "scsi-verify")) work_kind = 6;
    else if (word_is(w, "scsi-errors")) work_kind = 7;
    else if (word_is(w, "scsi-eio")) work_kind = 9;
    else if (word_is(w, "scsi-bench")) work_kind = 8;
    else if (word_is(w, "scsi-unplug")) work_kind = 10;
    else if (word_is(w, "scsi-unplug-restore")) work_kind = 11;
    else { printk("ringvm-guest: unknown work\n"); bad = 1; }
    u64 mib = param_u64("mib", 64, &bad);
    rate_mibps = param_u64("rate", 0, &bad);
    secs = param_u64("secs", 0, &bad);
    beat_ms = param_u64("beat", 0, &bad);
    workers = param_u64("workers", 0, &bad);
    region_seed = param_u64("seed", 1, &bad);
    if (bad) guest_exit(2);
    if (work_kind == 4) guest_exit(0);
    if (work_kind == 5) {
        /* Reboot through the i8042 `count` times, then pass. */
        u64 want = param_u64("count", 1, &bad);
        volatile u64 *ctr = (volatile u64 *)REBOOT_COUNTER_ADDR;
        if (ctr[0] != REBOOT_MAGIC) { ctr[0] = REBOOT_MAGIC; ctr[1] = 0; }
        printk("ringvm-guest: boot %u of %u\n", ctr[1] + 1, want + 1);
        if (ctr[1] < want) { ctr[1]++; outb(0x64, 0xfe); for (;;) cpu_relax(); }
        ctr[0] = 0;
        printk("ringvm-guest: reboots done %u\n", want);
        guest_exit(0);
    }

    calibrate_tsc();
    if (work_kind >= 6) {
        scsi_bs = param_u64("bs", 65536, &bad);
        scsi_qd = param_u64("qd", 8, &bad);
        scsi_seed = region_seed;
        scsi_passes = param_u64("passes", 1, &bad);
        scsi_reboots = param_u64("reboots", 0, &bad);
        const char *pat = param("pattern");
        bench_pattern = !pat || word_is(pat, "randread") ? 0 : word_is(pat, "read") ? 1 : word_is(pat, "write") ? 2 : 3;
        if (bad || !scsi_passes || bench_pattern == 3 || scsi_bs < 512 || scsi_bs % 512 || scsi_bs > 4 * MIB || !scsi_qd || scsi_qd > SLOTS) {
            printk("ringvm-guest: bad scsi parameters\n");
            guest_exit(2);
        }
        if (!nr_ranges) guest_exit(3);
        heap_next = ranges[0].start;
        heap_end = ranges[0].start + ranges[0].pages * PAGE;
    }
    /* Generation table first, then the pages. */
    u64 avail = nr_ranges ? ranges[nr_ranges - 1].first_page + ranges[nr_ranges - 1].pages : 0;
    nr_pages = mib * (MIB / PAGE);
    u64 table_pages = (nr_pages * 4 + PAGE - 1) / PAGE;
    if (nr_pages + table_pages > avail) {
        printk("ringvm-guest: mib=%u does not fit in %u MiB of usable RAM\n", mib, avail * PAGE / MIB);
        guest_exit(2);
    }
    if (!nr_ranges || ranges[0].pages < table_pages) { printk("ringvm-guest: no room for the page table\n"); guest_exit(2); }
    gen_table = (u32 *)page_addr(0);
    /* Shift the page index space past the table (it lives at the start of range 0). */
    ranges[0].start += table_pages * PAGE;
    ranges[0].pages -= table_pages;
    for (int r = 1; r < nr_ranges; r++) ranges[r].first_page = ranges[r - 1].first_page + ranges[r - 1].pages;
    printk("ringvm-guest: tsc_khz=%u pages=%u rate=%u secs=%d\n", tsc_khz, nr_pages, rate_mibps, (i64)(secs == ~0ULL ? -1 : (i64)secs));

    if (n > 1) {
        /* Wake the application processors: INIT, SIPI, SIPI to all but self. */
        u8 *dst = (u8 *)0x8000;
        for (char *s = ap_tramp; s < ap_tramp_end; s++) *dst++ = (u8)*s;
        volatile u32 *icr = (volatile u32 *)0xFEE00300;
        *icr = 0x000C4500;
        u64 t = rdtsc(); while (rdtsc() - t < tsc_khz * 10) cpu_relax();
        *icr = 0x000C4608;
        t = rdtsc(); while (rdtsc() - t < tsc_khz) cpu_relax();
        if (cpus_online < n) *icr = 0x000C4608;
        t = rdtsc();
        while (cpus_online < n && rdtsc() - t < tsc_khz * 2000) cpu_relax();
        if (cpus_online < n) printk("ringvm-guest: only %u of %u cpus came up\n", (u64)cpus_online, (u64)n);
        n = cpus_online;
    }
    ncpus = n;
    if (work_kind == 1 && workers && workers < ncpus) ncpus = (u32)workers;
    printk("ringvm-guest: cpus online=%u\n", (u64)n);
    if (work_kind >= 6) {
        want_hotplug = work_kind == 10 || work_kind == 11;
        inflight_report();
        if (virtio_scsi_init(ncpus, scsi_bs) < 0 || discover_luns(&queues[0]) < 0) guest_exit(3);
        u64 cap = capacity_blocks(&queues[0], lun_ids[0]) * 512;
        for (u32 l = 1; l <= max_lun; l++) { u64 c2 = capacity_blocks(&queues[0], lun_ids[l]) * 512; if (c2 < cap) cap = c2; }
        if (cap < scsi_bs) { printk("ringvm-guest: disk capacity %u is below one block of %u\n", cap, scsi_bs); guest_exit(3); }
        scsi_bytes_per_lun = mib ? mib * MIB : cap;
        if (scsi_bytes_per_lun > cap) scsi_bytes_per_lun = cap;
        scsi_bytes_per_lun -= scsi_bytes_per_lun % scsi_bs;
        printk("ringvm-guest: virtio-scsi queues=%u luns=%u capacity=%u bytes\n", (u64)num_req_queues, (u64)max_lun + 1, cap);
        if (work_kind == 7) {
            int ok = scsi_errors();
            printk("ringvm-guest: scsi-errors %s\n", ok ? "PASS" : "FAIL");
            guest_exit(ok ? 0 : 1);
        }
        if (work_kind == 9) {
            int ok = scsi_eio();
            printk("ringvm-guest: scsi-eio %s\n", ok ? "PASS" : "FAIL");
            guest_exit(ok ? 0 : 1);
        }
        if (work_kind == 11) {
            int ok = scsi_unplug_restore();
            printk("ringvm-guest: RESULT %s\n", ok ? "PASS" : "FAIL");
            guest_exit(ok ? 0 : 1);
        }
        if (work_kind == 10) {
            int ok = scsi_unplug();
            printk("ringvm-guest: scsi-unplug %s\n", ok ? "PASS" : "FAIL");
            guest_exit(ok ? 0 : 1);
        }
        if (scsi_reboots) {
            volatile u64 *ctr = (volatile u64 *)REBOOT_COUNTER_ADDR;
            if (ctr[0] != REBOOT_MAGIC) { ctr[0] = REBOOT_MAGIC; ctr[1] = 0; }
            if (ctr[1] < scsi_reboots) {
                ctr[1]++;
                scsi_reboot_at = rdtsc() + (1 + ctr[1] % 10) * 2 * tsc_khz;
                printk("ringvm-guest: scsi reboot %u of %u armed\n", ctr[1], scsi_reboots);
            } else {
                ctr[0] = 0;
                printk("ringvm-guest: scsi reboots done %u\n", scsi_reboots);
            }
        }
        go_flag = 1;
        u64 t0 = rdtsc();
        run_work(0);
        while (verified_count < ncpus) cpu_relax();
        u64 ms = ms_since(t0);
        /* An armed reset whose time came after the whole run (a slow host): still reset, so every armed one happens. */
        if (scsi_reboot_at) { outb(0x64, 0xfe); for (;;) cpu_relax(); }
        if (work_kind == 6) {
            printk("ringvm-guest: scsi-verify luns=%u bytes=%u bad=%u ms=%u\n", (u64)max_lun + 1, scsi_bytes_per_lun, scsi_bad, ms);
            printk("ringvm-guest: RESULT %s\n", scsi_bad ? "FAIL" : "PASS");
            guest_exit(scsi_bad ? 1 : 0);
        }
        u64 ops = 0;
        for (u32 c = 0; c < ncpus; c++) ops += bench_ops[c];
        if (!ms) ms = 1;
        printk("ringvm-guest: scsi-bench pattern=%s bs=%u qd=%u queues=%u ops=%u ms=%u iops=%u kbps=%u\n",
               bench_pattern == 0 ? "randread" : bench_pattern == 1 ? "read" : "write", scsi_bs, scsi_qd, (u64)num_req_queues, ops, ms, ops * 1000 / ms, ops * scsi_bs / ms);
        guest_exit(0);
    }
    go_flag = 1;
    run_work(0);
    while (verified_count < ncpus) cpu_relax();
    printk("ringvm-guest: verify pages=%u bad=%u ms=%u\n", nr_pages, bad_pages, ms_since(t_start));
    printk("ringvm-guest: RESULT %s\n", bad_pages ? "FAIL" : "PASS");
    guest_exit(bad_pages ? 1 : 0);
}
