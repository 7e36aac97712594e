#!/usr/bin/env bash
# Installs the benchmark peers and what the harness needs (idempotent):
# fio; QEMU 10 from bookworm-backports; a TrueType font for the plots;
# fuse3 for the NFS stand-in; nfs-ganesha, libnfs and iproute2 for the real
# NFS suite. The backports suite is added with the same mirror and keyring
# as the machine's existing Debian apt source; no host name is written
# here. The machine's qemu-utils stays as it is.
source "$(dirname "$0")/lib.sh"
apt_install fio fonts-dejavu-core fuse3
ensure_nfs_deps
if ! qemu-system-x86_64 --version 2>/dev/null | grep -q 'version 10'; then
    ensure_backports
    log "installing qemu-system-x86 from bookworm-backports"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
fi
qemu-system-x86_64 --version | head -1 >&2
