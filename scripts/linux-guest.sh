#!/usr/bin/env bash
# Builds a Linux guest from Debian packages into $CACHE/linux (idempotent):
#   vmlinux    - the cloud kernel, uncompressed, bootable through PVH
#   bzImage    - the same kernel as shipped (64-bit boot protocol)
#   initramfs  - busybox-static + virtio_pci/scsi_mod/virtio_scsi/sd_mod + an init
# Prints the directory.
source "$(dirname "$0")/lib.sh"
apt_install lz4 cpio xz-utils zstd python3
OUT="$CACHE/linux"
mkdir -p "$OUT"
if [ -s "$OUT/vmlinux" ] && [ -s "$OUT/initramfs.cpio.gz" ] && [ -s "$OUT/bzImage" ]; then
    echo "$OUT"; exit 0
fi
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
cd "$work"
[ -f "$CACHE/.apt-updated" ] || { apt-get update -qq && touch "$CACHE/.apt-updated"; }
kpkg="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
[ -n "$kpkg" ] || { log "cannot resolve linux-image-cloud-amd64"; exit 1; }
log "fetching $kpkg and busybox-static"
apt-get download -qq "$kpkg" busybox-static 2>/dev/null
dpkg-deb -x "$kpkg"_*.deb kernel
dpkg-deb -x busybox-static_*.deb bb
vmlinuz="$(ls kernel/boot/vmlinuz-*)"
kver="${vmlinuz##*/vmlinuz-}"
cp "$vmlinuz" "$OUT/bzImage.tmp"
# Unpack the bzImage payload (its compressed vmlinux) by the boot header.
python3 - "$vmlinuz" payload <<'PY'
import struct, sys
d = open(sys.argv[1], 'rb').read()
setup = (d[0x1f1] or 4) + 1
off, length = struct.unpack_from('<II', d, 0x248)
open(sys.argv[2], 'wb').write(d[setup * 512 + off: setup * 512 + off + length])
PY
magic="$(head -c 4 payload | od -An -tx1 | tr -d ' ')"
case "$magic" in
    02214c18) lz4 -dc payload > vmlinux 2>/dev/null || true ;;
    fd377a58) xz -dc payload > vmlinux 2>/dev/null || true ;;
    28b52ffd) zstd -dcq payload > vmlinux 2>/dev/null || true ;;
    1f8b*)    gzip -dc payload > vmlinux 2>/dev/null || true ;;
    *) log "unknown kernel payload compression (magic $magic)"; exit 1 ;;
esac
head -c 4 vmlinux | grep -q ELF || { log "vmlinux extraction failed"; exit 1; }
# initramfs: busybox, the storage modules, an init that loads them.
mkdir -p root/{bin,sbin,proc,sys,dev,lib/modules,mnt}
cp bb/bin/busybox root/bin/busybox
for m in virtio_pci virtio_pci_modern_dev virtio_pci_legacy_dev virtio_ring virtio scsi_common scsi_mod virtio_scsi sd_mod crc64_rocksoft crc64 crc_t10dif crct10dif_common t10_pi; do
    f="$(find kernel/lib/modules/"$kver" -name "$m.ko*" | head -1)"
    [ -n "$f" ] || continue
    case "$f" in
        *.xz) xz -dc "$f" > "root/lib/modules/$m.ko" ;;
        *.zst) zstd -dcq "$f" > "root/lib/modules/$m.ko" ;;
        *) cp "$f" "root/lib/modules/$m.ko" ;;
    esac
done
cat > root/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci scsi_common scsi_mod crc64 crc64_rocksoft crct10dif_common crc_t10dif t10_pi sd_mod virtio_scsi; do
    [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko 2>/dev/null
done
echo "ringvm-linux: init up; disks: $(ls /sys/block 2>/dev/null | tr '\n' ' ')"
exec sh
INIT
chmod +x root/init
(cd root && find . | cpio -o -H newc --quiet | gzip -9) > "$OUT/initramfs.cpio.gz"
mv vmlinux "$OUT/vmlinux"
mv "$OUT/bzImage.tmp" "$OUT/bzImage"
echo "$kver" > "$OUT/version"
log "Linux guest $kver ready in $OUT"
echo "$OUT"
