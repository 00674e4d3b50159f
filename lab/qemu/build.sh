#!/usr/bin/env bash
# Builds the lab's qemu-system-x86_64 from Debian's own QEMU source package with
# the patches beside this script applied (each header says why: stock QEMU
# deadlocks in COLO checkpoints under TCG; colo-compare misparses an input that
# reconnected mid-packet). The result is cached outside the checkout, keyed by
# source version and patch hashes, so a fresh clone on the same machine reuses it.
#
# Prints the path of the binary on its last line of stdout.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
version=${COLOFT_QEMU_DEB_VERSION:-1:10.0.13+ds-0+deb13u1}
suite=${COLOFT_QEMU_DEB_SUITE:-trixie}
cache=${COLOFT_CACHE:-/var/cache/coloft}
patches=("$here/colo-tcg-bql.patch" "$here/colo-compare-reconnect.patch")
# Contents only: the same sources in another checkout must give the same key.
key="$(echo "$version" | tr ':+~' '___')-$(cat "${patches[@]}" "$0" | sha256sum | cut -c1-12)"
prefix="$cache/qemu/$key"
binary="$prefix/qemu-system-x86_64"

log() { echo "qemu-build: $*" >&2; }

if [ -x "$binary" ]; then
    echo "$binary"
    exit 0
fi

mkdir -p "$cache/qemu"
exec 9>"$cache/qemu/.lock"
flock 9
if [ -x "$binary" ]; then
    echo "$binary"
    exit 0
fi

work="$cache/qemu/build-$key"
rm -rf "$work"
mkdir -p "$work/lists/partial"
buildlog="$cache/qemu/build-$key.log"
log "building patched QEMU $version (6-12 minutes on 2 cores); log: $buildlog"
exec 3>&2 2>"$buildlog"
trap 'echo "qemu-build: FAILED; last lines of $buildlog:" >&3; tail -n 30 "$buildlog" >&3' ERR

# A private apt source list: the machine's own apt setup stays untouched.
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" \
    >"$work/sources.list"
apto=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o "Dir::State::Lists=$work/lists")
apt-get "${apto[@]}" -qq update >&2
(cd "$work" && apt-get "${apto[@]}" -qq source --download-only "qemu=$version" >&2)
upstream=${version#*:}
upstream=${upstream%-*}
tar -C "$work" -xf "$work/qemu_${upstream}.orig.tar.xz"
src=$(find "$work" -maxdepth 1 -type d -name 'qemu-*' | head -n 1)
for p in "${patches[@]}"; do
    patch -d "$src" -p1 --forward <"$p" >&2
done
# The +ds tarball has no EDK2 firmware blobs; unpacking them would fail the build.
sed -i 's/unpack_edk2_blobs = bzip2.found()/unpack_edk2_blobs = false/' "$src/meson.build"

# QEMU 10 needs meson >= 1.5 (Debian 12 ships 1.0) and the +ds tarball lacks
# QEMU's bundled Python wheels: give configure a venv that has them.
/usr/bin/python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q meson==1.5.0 pycotap==1.3.1 >&2

mkdir -p "$src/build"
cd "$src/build"
../configure --python="$work/venv/bin/python3" \
    --target-list=x86_64-softmmu --without-default-features \
    --enable-tcg --enable-kvm --enable-replication --enable-colo-proxy --enable-gnutls \
    --disable-docs --disable-tools --disable-user --disable-werror \
    --disable-install-blobs >&2
ninja -j"$(nproc)" qemu-system-x86_64 >&2
mkdir -p "$prefix"
install -m 0755 qemu-system-x86_64 "$binary.tmp"
mv "$binary.tmp" "$binary"
cd /
rm -rf "$work"
exec 2>&3
log "built $binary"
echo "$binary"
