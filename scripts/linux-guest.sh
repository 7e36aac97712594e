#!/usr/bin/env bash
# Builds ringvm's Linux test guest (idempotent) and prints its directory:
#   vmlinux   - PVH-bootable ELF
#   bzImage   - the same build, Linux boot protocol
#   root.img  - a 64 MiB ext4 root filesystem (made without root privileges)
#               whose /sbin/init is the self-test's init marker
#   cmdline   - the kernel command line this host needs (see README)
# The kernel is Debian's linux-source-6.12 with `make tinyconfig`, the
# fragment scripts/linux/ringvm.config, the patches scripts/linux/*.patch and
# the in-kernel I/O self-test scripts/linux/ringvm_ktest.c. Output lives in
# $CACHE/linux-<key>, key = hash of all of those and the source package
# version, so CI builds it once per machine; $CACHE/linux links to it.
source "$(dirname "$0")/lib.sh"
# Stdout carries the directory and nothing else (callers capture it): every
# tool's chatter goes to stderr (mke2fs 1.47 prints "Creating regular file"
# on stdout even with -q).
exec 3>&1 1>&2
ensure_backports
apt_install_backports linux-source-6.12
apt_install bc flex bison libelf-dev libssl-dev cpio xz-utils e2fsprogs make gcc
SRC_TAR=/usr/src/linux-source-6.12.tar.xz
[ -f "$SRC_TAR" ] || { log "$SRC_TAR missing after installing linux-source-6.12"; exit 1; }
pkgver="$(dpkg-query -W -f='${Version}' linux-source-6.12)"
key="$( { echo "$pkgver"; cat "$ROOT"/scripts/linux/ringvm.config "$ROOT"/scripts/linux/*.patch \
          "$ROOT"/scripts/linux/ringvm_ktest.c "$ROOT"/scripts/linux-guest.sh; } | sha256sum | cut -c1-16)"
OUT="$CACHE/linux-$key"
if [ -s "$OUT/vmlinux" ] && [ -s "$OUT/bzImage" ] && [ -s "$OUT/root.img" ]; then
    ln -sfn "linux-$key" "$CACHE/linux"
    echo "$OUT" >&3; exit 0
fi
BUILD="$CACHE/linux-build"
TREE="$BUILD/linux-source-6.12"
# The tree is reused across keys (incremental builds) when its source
# package version matches; patches are applied to a fresh copy of the files
# they touch, so a changed patch never stacks on an old one.
if [ "$(cat "$BUILD/.pkgver" 2>/dev/null)" != "$pkgver" ] || [ ! -f "$TREE/Makefile" ]; then
    rm -rf "$BUILD"; mkdir -p "$BUILD"
    log "unpacking linux-source-6.12 $pkgver"
    tar -C "$BUILD" -xJf "$SRC_TAR"
    echo "$pkgver" > "$BUILD/.pkgver"
fi
cd "$TREE"
for p in "$ROOT"/scripts/linux/*.patch; do
    for f in $(awk '/^\+\+\+ b\//{sub("^b/","",$2); print $2}' "$p"); do
        tar -xJf "$SRC_TAR" -O "linux-source-6.12/$f" > "$f"
    done
    patch -p1 -s --no-backup-if-mismatch < "$p"
done
# The self-test: drivers/misc/ringvm_ktest.c, CONFIG_RINGVM_KTEST.
cp "$ROOT/scripts/linux/ringvm_ktest.c" drivers/misc/ringvm_ktest.c
grep -q RINGVM_KTEST drivers/misc/Makefile || echo 'obj-$(CONFIG_RINGVM_KTEST) += ringvm_ktest.o' >> drivers/misc/Makefile
if ! grep -q RINGVM_KTEST drivers/misc/Kconfig; then
    sed -i '$d' drivers/misc/Kconfig   # the closing endmenu
    printf 'config RINGVM_KTEST\n\tbool "ringvm in-kernel block I/O self-test"\n\tdepends on SCSI && BLK_DEV_SD\n\nendmenu\n' >> drivers/misc/Kconfig
fi
if [ ! -f .config ] || ! cmp -s "$ROOT/scripts/linux/ringvm.config" .ringvm.config; then
    log "configuring Linux (tinyconfig + scripts/linux/ringvm.config)"
    make -s tinyconfig >/dev/null
    scripts/kconfig/merge_config.sh -m .config "$ROOT/scripts/linux/ringvm.config" >/dev/null
    make -s olddefconfig >/dev/null
    cp "$ROOT/scripts/linux/ringvm.config" .ringvm.config
fi
# Every option of the fragment must have taken (a dependency missed is a
# silently smaller kernel).
while IFS= read -r line; do
    case "$line" in CONFIG_*=y) grep -qx "$line" .config || { log "Linux config: $line did not take"; exit 1; } ;; esac
done < "$ROOT/scripts/linux/ringvm.config"
log "building Linux (about 8 minutes on 2 cores when cold)"
make -s -j"$(nproc)" KBUILD_BUILD_TIMESTAMP=ringvm KBUILD_BUILD_USER=ringvm KBUILD_BUILD_HOST=ringvm vmlinux bzImage >/dev/null
tmp="$OUT.tmp"; rm -rf "$tmp"; mkdir -p "$tmp"
cp vmlinux "$tmp/vmlinux"
cp arch/x86/boot/bzImage "$tmp/bzImage"
# Root filesystem: made from a directory with mkfs.ext4 -d, no mount, no root.
rootdir="$(mktemp -d)"; trap 'rm -rf "$rootdir"' EXIT
mkdir -p "$rootdir"/{sbin,dev,proc,sys,etc}
printf 'RINGVM-KTEST-INIT\nThis file is the init of ringvm'"'"'s Linux test guest: the kernel'"'"'s\nringvm_ktest binary format takes it (scripts/linux/ringvm_ktest.c).\n' > "$rootdir/sbin/init"
chmod 755 "$rootdir/sbin/init"
echo "ringvm Linux test guest root" > "$rootdir/etc/ringvm-root"
mkfs.ext4 -q -F -L ringvm-root -E root_owner=0:0 -d "$rootdir" "$tmp/root.img" 64M
echo "console=ttyS0 panic=-1 root=/dev/sda rw noxsave no_int3_selftest no_fpu_drop_fwait clearcpuid=popcnt,fsgsbase,smap,smep,pku,rdrand,rdseed,rdpid,invpcid,umip,clflushopt,clwb" > "$tmp/cmdline"
echo "$pkgver" > "$tmp/version"
rm -rf "$OUT"; mv "$tmp" "$OUT"
ln -sfn "linux-$key" "$CACHE/linux"
# Older outputs (other keys) go; the build tree stays for the next one.
for d in "$CACHE"/linux-*; do
    case "$d" in "$OUT"|"$BUILD") ;; *) [ -d "$d" ] && rm -rf "$d" ;; esac
done
log "Linux guest ready in $OUT"
echo "$OUT" >&3
