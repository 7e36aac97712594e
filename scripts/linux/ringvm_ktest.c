// SPDX-License-Identifier: GPL-2.0
/*
 * ringvm_ktest: the in-kernel block I/O self-test of ringvm's Linux test
 * guest (built into drivers/misc by scripts/linux-guest.sh).
 *
 * On the host ringvm is developed on, guest user mode cannot run (see the
 * README), so the I/O a user's programs would do is done here, by kernel
 * code, through the same block layer, SCSI midlayer and virtio-scsi driver:
 *
 *   ringvm_ktest.disk=sdb       the disk to test (nothing happens without it)
 *   ringvm_ktest.seed=N         pattern seed (default 0x52494e47564d)
 *   ringvm_ktest.mib=N          size of the pattern region (default 4)
 *   ringvm_ktest.offset_mib=N   where it starts on the disk (default 1)
 *   ringvm_ktest.power=1        after the test, wait for the power button
 *                               (an ACPI Notify, as QMP system_powerdown
 *                               sends it) and power off instead of restarting
 *
 * A thread started at late_initcall waits for the disk, then:
 *   1. writes the pattern over [offset, offset + mib) in 256 KiB bios, the
 *      second half with REQ_FUA, then a cache flush;
 *   2. reads it all back and verifies every byte;
 *   3. writes the pattern over the next MiB, DISCARDs it, and if the disk
 *      says discarded blocks read as zeroes (VPD B2h LBPRZ) checks they do;
 *   4. writes the pattern over the MiB after that, WRITE ZEROES it (no
 *      fallback to plain writes) and checks it reads back as zeroes;
 *   5. reads VPD pages 00h, 83h, B0h, B2h and READ CAPACITY(16) and checks
 *      them against what the block layer was told;
 *   6. prints one line: "RINGVM-KTEST PASS ..." or "RINGVM-KTEST FAIL ...".
 *
 * The pattern word at disk byte offset o (8-aligned) is
 *   (o / 8) * 0x9e3779b97f4a7c15 ^ seed   (little-endian u64)
 * so the host can check what landed where.
 *
 * The root filesystem's init is a file beginning with "RINGVM-KTEST-INIT":
 * a binary format registered here takes it, waits for the self-test,
 * remounts every filesystem read-only (the host then finds the root clean)
 * and restarts the machine (or, with power=1, waits for KEY_POWER from the
 * ACPI button and powers off through ACPI S5). No user-mode instruction
 * runs.
 */
#define pr_fmt(fmt) "ringvm-ktest: " fmt

#include <linux/bio.h>
#include <linux/binfmts.h>
#include <linux/blkdev.h>
#include <linux/completion.h>
#include <linux/delay.h>
#include <linux/fs.h>
#include <linux/fs_struct.h>
#include <linux/init.h>
#include <linux/input.h>
#include <linux/jiffies.h>
#include <linux/kthread.h>
#include <linux/module.h>
#include <linux/mount.h>
#include <linux/reboot.h>
#include <linux/string.h>
#include <linux/unaligned.h>
#include <scsi/scsi_device.h>
#include <scsi/scsi_proto.h>

static char *disk = "";
module_param(disk, charp, 0444);
static ulong seed = 0x52494e47564dUL;
module_param(seed, ulong, 0444);
static uint mib = 4;
module_param(mib, uint, 0444);
static uint offset_mib = 1;
module_param(offset_mib, uint, 0444);
static bool power;
module_param(power, bool, 0444);
/* Guest seconds to wait for the disk to appear. */
static uint wait_s = 900;
module_param(wait_s, uint, 0444);

#define INIT_MAGIC "RINGVM-KTEST-INIT"
#define CHUNK (256 * 1024)
#define CHUNK_PAGES (CHUNK / PAGE_SIZE)
#define MIB (1024 * 1024ULL)

static DECLARE_COMPLETION(ktest_done);
static DECLARE_COMPLETION(power_pressed);
static char fail_reason[160];

struct chunk {
	struct page *pages[CHUNK_PAGES];
};

static u64 pattern_word(u64 off)
{
	return (off >> 3) * 0x9e3779b97f4a7c15ULL ^ seed;
}

static void chunk_free(struct chunk *c)
{
	int i;

	for (i = 0; i < CHUNK_PAGES; i++)
		if (c->pages[i])
			__free_page(c->pages[i]);
}

static int chunk_alloc(struct chunk *c)
{
	int i;

	memset(c, 0, sizeof(*c));
	for (i = 0; i < CHUNK_PAGES; i++) {
		c->pages[i] = alloc_page(GFP_KERNEL);
		if (!c->pages[i]) {
			chunk_free(c);
			return -ENOMEM;
		}
	}
	return 0;
}

/* Fills the chunk with what belongs at disk offset @off (or zeroes). */
static void chunk_fill(struct chunk *c, u64 off, bool zero)
{
	int i, j;

	for (i = 0; i < CHUNK_PAGES; i++) {
		u64 *w = page_address(c->pages[i]);

		for (j = 0; j < PAGE_SIZE / 8; j++)
			w[j] = zero ? 0 : pattern_word(off + i * PAGE_SIZE + j * 8);
	}
}

/* Number of 8-byte words that differ from what belongs at @off. */
static u64 chunk_check(struct chunk *c, u64 off, bool zero, u64 *first_bad)
{
	u64 bad = 0;
	int i, j;

	for (i = 0; i < CHUNK_PAGES; i++) {
		const u64 *w = page_address(c->pages[i]);

		for (j = 0; j < PAGE_SIZE / 8; j++) {
			u64 o = off + i * PAGE_SIZE + j * 8;

			if (w[j] != (zero ? 0 : pattern_word(o))) {
				if (!bad)
					*first_bad = o;
				bad++;
			}
		}
	}
	return bad;
}

static int chunk_io(struct block_device *bdev, struct chunk *c, u64 off,
		    blk_opf_t opf)
{
	struct bio *bio;
	int i, ret;

	bio = bio_alloc(bdev, CHUNK_PAGES, opf, GFP_KERNEL);
	bio->bi_iter.bi_sector = off >> SECTOR_SHIFT;
	for (i = 0; i < CHUNK_PAGES; i++) {
		if (bio_add_page(bio, c->pages[i], PAGE_SIZE, 0) != PAGE_SIZE) {
			bio_put(bio);
			return -EIO;
		}
	}
	ret = submit_bio_wait(bio);
	bio_put(bio);
	return ret;
}

#define FAIL(fmt, ...) do { \
	snprintf(fail_reason, sizeof(fail_reason), fmt, ##__VA_ARGS__); \
	return -EIO; \
} while (0)

/* Writes the pattern over [start, end), the second half with FUA. */
static int write_pattern(struct block_device *bdev, struct chunk *c, u64 start,
			 u64 end)
{
	u64 off;
	int ret;

	for (off = start; off < end; off += CHUNK) {
		blk_opf_t opf = REQ_OP_WRITE;

		if (off - start >= (end - start) / 2)
			opf |= REQ_FUA;
		chunk_fill(c, off, false);
		ret = chunk_io(bdev, c, off, opf);
		if (ret)
			FAIL("write at %llu: %d", off, ret);
	}
	return 0;
}

static int verify(struct block_device *bdev, struct chunk *c, u64 start,
		  u64 end, bool zero, const char *what)
{
	u64 off, bad, first = 0;
	int ret;

	for (off = start; off < end; off += CHUNK) {
		ret = chunk_io(bdev, c, off, REQ_OP_READ);
		if (ret)
			FAIL("%s: read at %llu: %d", what, off, ret);
		bad = chunk_check(c, off, zero, &first);
		if (bad)
			FAIL("%s: %llu bad words from byte %llu", what, bad, first);
	}
	return 0;
}

static int scsi_checks(struct block_device *bdev, bool *lbprz)
{
	struct device *parent = disk_to_dev(bdev->bd_disk)->parent;
	static const struct scsi_exec_args args;
	struct scsi_device *sdev;
	unsigned char cmd[16] = { SERVICE_ACTION_IN_16, SAI_READ_CAPACITY_16 };
	unsigned char *buf;
	u64 last_lba, bytes;
	u32 block;
	int ret;

	if (!parent || !scsi_is_sdev_device(parent))
		FAIL("%s is not a SCSI disk", disk);
	sdev = to_scsi_device(parent);
	buf = kzalloc(256, GFP_KERNEL);
	if (!buf)
		FAIL("no memory");
	ret = -EIO;
	if (scsi_get_vpd_page(sdev, 0x00, buf, 256)) {
		snprintf(fail_reason, sizeof(fail_reason), "VPD 00h unreadable");
		goto out;
	}
	if (!memchr(buf + 4, 0xb0, buf[3]) || !memchr(buf + 4, 0x83, buf[3])) {
		snprintf(fail_reason, sizeof(fail_reason), "VPD 00h lacks 83h/B0h");
		goto out;
	}
	if (scsi_get_vpd_page(sdev, 0x83, buf, 256) || buf[1] != 0x83 ||
	    get_unaligned_be16(&buf[2]) < 4) {
		snprintf(fail_reason, sizeof(fail_reason), "VPD 83h (device identification) bad");
		goto out;
	}
	if (scsi_get_vpd_page(sdev, 0xb0, buf, 256) || buf[1] != 0xb0) {
		snprintf(fail_reason, sizeof(fail_reason), "VPD B0h (block limits) unreadable");
		goto out;
	}
	memset(buf, 0, 256);
	if (scsi_get_vpd_page(sdev, 0xb2, buf, 256) || buf[1] != 0xb2) {
		snprintf(fail_reason, sizeof(fail_reason), "VPD B2h (logical block provisioning) unreadable");
		goto out;
	}
	*lbprz = buf[5] & 0x04;
	memset(buf, 0, 32);
	cmd[13] = 32;
	if (scsi_execute_cmd(sdev, cmd, REQ_OP_DRV_IN, buf, 32, 30 * HZ, 3, &args)) {
		snprintf(fail_reason, sizeof(fail_reason), "READ CAPACITY(16) failed");
		goto out;
	}
	last_lba = get_unaligned_be64(&buf[0]);
	block = get_unaligned_be32(&buf[8]);
	bytes = (last_lba + 1) * block;
	if (block != bdev_logical_block_size(bdev) ||
	    bytes != bdev_nr_sectors(bdev) << SECTOR_SHIFT) {
		snprintf(fail_reason, sizeof(fail_reason),
			 "READ CAPACITY(16) says %llu x %u, the block layer %llu x %u",
			 last_lba + 1, block, bdev_nr_sectors(bdev),
			 bdev_logical_block_size(bdev));
		goto out;
	}
	pr_info("%s: %.8s %.16s, %llu blocks of %u, lbprz=%d\n", disk,
		sdev->vendor, sdev->model, last_lba + 1, block, *lbprz);
	ret = 0;
out:
	kfree(buf);
	return ret;
}

static int run_tests(struct block_device *bdev)
{
	u64 start = offset_mib * MIB, end = start + mib * MIB;
	u64 disc = end, zero = end + MIB, stop = end + 2 * MIB;
	struct chunk c;
	bool lbprz = false;
	int ret;

	if (!mib || stop > bdev_nr_sectors(bdev) << SECTOR_SHIFT)
		FAIL("%s is too small for %u MiB at %u MiB plus 2 MiB", disk, mib, offset_mib);
	ret = scsi_checks(bdev, &lbprz);
	if (ret)
		return ret;
	if (chunk_alloc(&c))
		FAIL("no memory");

	ret = write_pattern(bdev, &c, start, end);
	if (!ret) {
		ret = blkdev_issue_flush(bdev);
		if (ret)
			snprintf(fail_reason, sizeof(fail_reason), "flush: %d", ret);
	}
	if (!ret)
		ret = verify(bdev, &c, start, end, false, "pattern");

	/* DISCARD (UNMAP): the region was written, then unmapped. */
	if (!ret && !bdev_max_discard_sectors(bdev)) {
		snprintf(fail_reason, sizeof(fail_reason), "no discard support");
		ret = -EIO;
	}
	if (!ret)
		ret = write_pattern(bdev, &c, disc, zero);
	if (!ret) {
		ret = blkdev_issue_discard(bdev, disc >> SECTOR_SHIFT,
					   MIB >> SECTOR_SHIFT, GFP_KERNEL);
		if (ret)
			snprintf(fail_reason, sizeof(fail_reason), "discard: %d", ret);
	}
	if (!ret && lbprz)
		ret = verify(bdev, &c, disc, zero, true, "discarded");

	/* WRITE ZEROES (WRITE SAME), no fallback to writing zero pages. */
	if (!ret && !bdev_write_zeroes_sectors(bdev)) {
		snprintf(fail_reason, sizeof(fail_reason), "no write-zeroes support");
		ret = -EIO;
	}
	if (!ret)
		ret = write_pattern(bdev, &c, zero, stop);
	if (!ret) {
		ret = blkdev_issue_zeroout(bdev, zero >> SECTOR_SHIFT,
					   MIB >> SECTOR_SHIFT, GFP_KERNEL,
					   BLKDEV_ZERO_NOFALLBACK);
		if (ret)
			snprintf(fail_reason, sizeof(fail_reason), "write zeroes: %d", ret);
	}
	if (!ret)
		ret = verify(bdev, &c, zero, stop, true, "zeroed");
	chunk_free(&c);

	if (!ret)
		pr_info("RINGVM-KTEST PASS disk=%s seed=%#lx pattern=%llu+%llu discard=%llu+%llu zeroes=%llu+%llu lbprz=%d\n",
			disk, seed, start, end - start, disc, MIB, zero, MIB, lbprz);
	return ret;
}

static int ktest_thread(void *unused)
{
	unsigned long deadline = jiffies + wait_s * HZ;
	struct block_device *bdev;
	struct file *file = NULL;
	struct device *dev;
	dev_t devt = 0;
	int ret;

	pr_info("waiting for disk %s\n", disk);
	/*
	 * The disk's device shows in the block class a moment before
	 * add_disk() finishes; until then opening it fails (-ENXIO), so
	 * both the lookup and the open are retried up to the deadline.
	 */
	for (;;) {
		dev = class_find_device_by_name(&block_class, disk);
		if (dev) {
			devt = dev->devt;
			put_device(dev);
			file = bdev_file_open_by_dev(devt, BLK_OPEN_READ | BLK_OPEN_WRITE, &ktest_done, NULL);
			if (!IS_ERR(file))
				break;
			if (time_after(jiffies, deadline)) {
				snprintf(fail_reason, sizeof(fail_reason), "cannot open %s: %ld", disk, PTR_ERR(file));
				file = NULL;
				goto out;
			}
			file = NULL;
		} else if (time_after(jiffies, deadline)) {
			snprintf(fail_reason, sizeof(fail_reason), "disk %s did not appear in %u s", disk, wait_s);
			goto out;
		}
		msleep(100);
	}
	bdev = file_bdev(file);
	pr_info("testing %s: %u MiB at %u MiB\n", disk, mib, offset_mib);
	ret = run_tests(bdev);
	if (ret && !fail_reason[0])
		snprintf(fail_reason, sizeof(fail_reason), "error %d", ret);
out:
	if (file)
		fput(file);
	if (fail_reason[0])
		pr_err("RINGVM-KTEST FAIL disk=%s: %s\n", disk, fail_reason);
	complete_all(&ktest_done);
	return 0;
}

/* KEY_POWER from any input device (the ACPI power button). */
static void power_event(struct input_handle *handle, unsigned int type,
			unsigned int code, int value)
{
	if (type == EV_KEY && code == KEY_POWER && value) {
		pr_info("power button pressed (%s)\n", handle->dev->name);
		complete_all(&power_pressed);
	}
}

static int power_connect(struct input_handler *handler, struct input_dev *dev,
			 const struct input_device_id *id)
{
	struct input_handle *handle;
	int ret;

	handle = kzalloc(sizeof(*handle), GFP_KERNEL);
	if (!handle)
		return -ENOMEM;
	handle->dev = dev;
	handle->handler = handler;
	handle->name = "ringvm-ktest";
	ret = input_register_handle(handle);
	if (!ret) {
		ret = input_open_device(handle);
		if (ret)
			input_unregister_handle(handle);
	}
	if (ret) {
		kfree(handle);
		return ret;
	}
	pr_info("listening for the power button on %s\n", dev->name);
	return 0;
}

static void power_disconnect(struct input_handle *handle)
{
	input_close_device(handle);
	input_unregister_handle(handle);
	kfree(handle);
}

static const struct input_device_id power_ids[] = {
	{
		.flags = INPUT_DEVICE_ID_MATCH_EVBIT | INPUT_DEVICE_ID_MATCH_KEYBIT,
		.evbit = { BIT_MASK(EV_KEY) },
		.keybit = { [BIT_WORD(KEY_POWER)] = BIT_MASK(KEY_POWER) },
	},
	{ },
};

static struct input_handler power_handler = {
	.event = power_event,
	.connect = power_connect,
	.disconnect = power_disconnect,
	.name = "ringvm-ktest",
	.id_table = power_ids,
};

/* The root filesystem's init: wait for the test, leave the disks clean, restart. */
static int ktest_load_init(struct linux_binprm *bprm)
{
	struct super_block *sb;
	unsigned long deadline;

	if (memcmp(bprm->buf, INIT_MAGIC, sizeof(INIT_MAGIC) - 1))
		return -ENOEXEC;
	sb = current->fs->root.mnt->mnt_sb;
	pr_info("init %s reached; root is %s (%s), waiting for the self-test\n",
		bprm->filename, sb->s_type->name, sb_rdonly(sb) ? "ro" : "rw");
	wait_for_completion(&ktest_done);
	if (power) {
		pr_info("RINGVM-KTEST waiting for the power button\n");
		if (!wait_for_completion_timeout(&power_pressed, 900 * HZ))
			pr_err("RINGVM-KTEST FAIL: no power button press in 900 s\n");
	}
	emergency_remount();
	deadline = jiffies + 120 * HZ;
	while (!sb_rdonly(sb) && time_before(jiffies, deadline))
		msleep(50);
	/*
	 * ext4 sets SB_RDONLY before it writes the clean superblock; the
	 * remount holds s_umount for writing throughout, so taking it for
	 * reading waits for the end.
	 */
	down_read(&sb->s_umount);
	up_read(&sb->s_umount);
	pr_info("RINGVM-KTEST DONE %s; root %s; %s\n",
		fail_reason[0] ? "FAIL" : "PASS",
		sb_rdonly(sb) ? "remounted ro" : "still rw",
		power ? "powering off" : "restarting");
	if (power)
		kernel_power_off();
	kernel_restart(NULL);
	return -ENOEXEC;
}

static struct linux_binfmt ktest_format = {
	.module = THIS_MODULE,
	.load_binary = ktest_load_init,
};

static int __init ringvm_ktest_init(void)
{
	struct task_struct *t;

	if (!disk[0])
		return 0;
	register_binfmt(&ktest_format);
	if (power && input_register_handler(&power_handler))
		pr_err("cannot listen for the power button\n");
	t = kthread_run(ktest_thread, NULL, "ringvm-ktest");
	if (IS_ERR(t)) {
		snprintf(fail_reason, sizeof(fail_reason), "no thread: %ld", PTR_ERR(t));
		pr_err("RINGVM-KTEST FAIL disk=%s: %s\n", disk, fail_reason);
		complete_all(&ktest_done);
	}
	return 0;
}
late_initcall(ringvm_ktest_init);
