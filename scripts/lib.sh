# Shared helpers for ringvm's scripts (sourced).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${RINGVM_CACHE:-$ROOT/.cache}"
mkdir -p "$CACHE"

log() { printf '[ringvm] %s\n' "$*" >&2; }

# apt_install PKG...: installs the Debian packages that are missing (idempotent).
# APT_RELEASE=bookworm-backports (see apt_install_backports) picks the suite.
apt_install() {
    local missing=() release=()
    [ -n "${APT_RELEASE:-}" ] && release=(-t "$APT_RELEASE")
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing Debian packages: ${missing[*]}"
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    if [ ! -f "$CACHE/.apt-updated" ] || [ -n "$(find "$CACHE/.apt-updated" -mmin +720 2>/dev/null)" ]; then
        $sudo apt-get update -qq && touch "$CACHE/.apt-updated"
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${release[@]}" "${missing[@]}" >/dev/null
}

# Build tools for the VMM and its test guest.
ensure_build_deps() {
    apt_install gcc make libc6-dev
    # mkfs.xfs: the snapshot test with "disks": "clone" reflinks on a loop-mounted XFS.
    apt_install xfsprogs
    # gdb: a failed test prints the still-running VMM's thread stacks.
    apt_install gdb
    # fusermount3: ringvm-faultfs (fault-injecting FUSE) in the reliability tests.
    apt_install fuse3
    command -v cargo >/dev/null || { log "cargo not found: install Rust (rustup) first"; exit 1; }
}

# nfs:// state files need libnfs at run time; the NFS tests run a real
# server (nfs-ganesha + rpcbind) in network namespaces (iproute2) and probe
# it with libnfs's nfs-ls.
ensure_nfs_deps() {
    apt_install libnfs13 libnfs-utils nfs-ganesha nfs-ganesha-vfs rpcbind iproute2 util-linux
}

# The Python QMP client the tests drive ringvm with (qemu.qmp, with
# qmp-shell), in a venv under the cache; prints the venv's python.
QEMU_QMP_VERSION=0.0.6
ensure_python_clients() {
    local venv="$CACHE/venv"
    if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('qemu.qmp') != '$QEMU_QMP_VERSION')" 2>/dev/null; then
        log "installing qemu.qmp $QEMU_QMP_VERSION into $venv"
        python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$venv"; }
        "$venv/bin/pip" install -q --disable-pip-version-check "qemu.qmp==$QEMU_QMP_VERSION" >&2
    fi
    echo "$venv/bin/python"
}

# bookworm-backports (QEMU 10, linux-source-6.12), added with the mirror and
# keyring of the machine's own Debian apt source; no host name is written here.
ensure_backports() {
    local src=/etc/apt/sources.list.d/debian.sources
    local dst=/etc/apt/sources.list.d/ringvm-backports.sources
    [ -f "$dst" ] && return 0
    [ -f "$src" ] || { log "no $src to take the mirror from"; exit 1; }
    local uri key
    uri="$(awk '/^URIs:/{print $2; exit}' "$src")"
    key="$(awk '/^Signed-By:/{print $2; exit}' "$src")"
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' "$uri" "$key" > "$dst"
    apt-get update -qq && touch "$CACHE/.apt-updated"
}

# apt_install_backports PKG...: as apt_install, from bookworm-backports.
apt_install_backports() {
    APT_RELEASE=bookworm-backports apt_install "$@"
}
