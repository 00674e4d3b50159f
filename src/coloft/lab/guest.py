"""Build the small Linux guest that the coloft lab runs under COLO.

The guest is Debian 12's own kernel plus a busybox initramfs whose ``/init``
(``guest_files/init``) loads the few modules it needs, configures ``eth0`` from
the kernel command line, mounts the virtio disk ``/dev/vda`` on ``/data`` with
``-o sync`` and serves a durable line-protocol key/value store on TCP port
:data:`SERVICE_PORT` (``guest_files/handler``, one busybox ``nc`` child per
connection).  On the serial console it prints ``coloft-guest: service up`` once
it serves, or ``coloft-guest: ERROR <reason>`` (and does not serve) when, for
example, the disk cannot be mounted.  The disk is ext4 without a journal, so
``/init`` runs ``e2fsck -y`` before mounting it: after a hard kill the bitmaps
and link counts on disk lag behind the (synchronously written) inodes and
directory entries.

Everything is built from Debian packages fetched with ``apt-get download``
(``linux-image-*-amd64``, ``busybox-static``, ``e2fsck-static``; nothing is
installed system-wide) and cached in
``<cache_dir>/guest/<key>/`` where ``key`` hashes the asset files, this source
file and the package versions, so a second build is a cache hit.  Builds are
serialised with an ``flock`` and written to a temporary directory that is
renamed into place, so concurrent builders never see a half-built image.

Host tools used: ``apt-get``, ``apt-cache``, ``dpkg-deb`` (always on Debian)
and ``mkfs.ext4`` (``e2fsprogs``).  The initramfs is written by Python (no
``cpio`` needed).
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import ipaddress
import json
import logging
import lzma
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from coloft.lab import packages as debs

log = logging.getLogger(__name__)

SERVICE_PORT = 7000
"""TCP port of the guest's key/value service."""

DEFAULT_CACHE_DIR = Path("/var/cache/coloft")
DISK_SIZE_MIB = 96
# The service keeps one small file per key: one inode per 1 KiB block, so a long
# soak runs out of neither (the default ratio gave 16k inodes, ~6 minutes of load).
DISK_INODES = DISK_SIZE_MIB * 1024

KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# The disk has no journal (as in the proven COLO recipe) and -o sync does not
# write the block/inode bitmaps synchronously, so after a hard kill the guest
# must repair them before mounting: a statically linked e2fsck runs in /init.
E2FSCK_PACKAGE = "e2fsck-static"

# Loaded in this order by /init; names that are built into the kernel are left out.
MODULES: tuple[str, ...] = (
    "crc16",
    "crc32c_generic",
    "mbcache",
    "jbd2",
    "ext4",
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "e1000",
)

ASSETS_DIR = Path(__file__).with_name("guest_files")
ASSET_FILES: tuple[str, ...] = ("init", "handler", "e2fsck.conf")

KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.gz"
DISK_NAME = "disk.raw"
MANIFEST_NAME = "manifest.json"

_APPEND_BASE = "console=ttyS0 ipv6.disable=1 panic=-1 quiet"
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


class GuestBuildError(Exception):
    """A step of the guest build failed; the message names the step."""


class _StaleAptLists(GuestBuildError):
    """apt's package lists point at versions the mirror no longer has."""


@dataclass(frozen=True)
class GuestService:
    """A program the guest's /init starts once the replicated disk is mounted."""

    name: str
    port: int
    run: str
    dirs: tuple[str, ...] = ()
    ready: str = ""


@dataclass(frozen=True)
class GuestSpec:
    """What a guest adds to the lab's base image: Debian packages and services."""

    name: str
    packages: tuple[str, ...]
    services: tuple[GuestService, ...]


_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+")


def load_guest_spec(path: Path) -> GuestSpec:
    """Read a guest file (examples/guests/redis.toml); GuestBuildError names the
    file and the field that is wrong."""

    def bad(what: str) -> GuestBuildError:
        return GuestBuildError(f"{path}: {what}")

    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise bad(f"cannot read: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"not valid TOML: {exc}") from exc
    unknown = set(doc) - {"name", "packages", "service"}
    if unknown:
        raise bad(f"unknown key(s) {', '.join(sorted(unknown))} (allowed: name, packages, service)")
    name = doc.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise bad("name must be 1-32 of a-z, 0-9 and '-', e.g. name = \"redis\"")
    pkgs = doc.get("packages", [])
    if not isinstance(pkgs, list) or not all(
        isinstance(p, str) and _PACKAGE.fullmatch(p) for p in pkgs
    ):
        raise bad('packages must be a list of Debian package names, e.g. ["redis-server"]')
    raw = doc.get("service", [])
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise bad("service must be an array of tables ([[service]])")
    services = tuple(_service(t, i, bad) for i, t in enumerate(raw))
    names = [s.name for s in services]
    ports = [s.port for s in services] + [SERVICE_PORT]
    if len(set(names)) != len(names) or len(set(ports)) != len(ports):
        raise bad(f"services need distinct names and ports (port {SERVICE_PORT} is the lab's own)")
    return GuestSpec(name, tuple(pkgs), services)


def _service(t: dict[str, object], i: int, bad: Callable[[str], GuestBuildError]) -> GuestService:
    where = f"service[{i}]"
    unknown = set(t) - {"name", "port", "run", "dirs", "ready"}
    if unknown:
        raise bad(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    name, port, run, dirs = t.get("name"), t.get("port"), t.get("run"), t.get("dirs", [])
    ready = t.get("ready", "")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise bad(f"{where}.name must be 1-32 of a-z, 0-9 and '-'")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise bad(f"{where}.port must be a TCP port number (1-65535)")
    if not isinstance(run, str) or not run.strip() or "\n" in run:
        raise bad(f"{where}.run must be one shell command line")
    if not isinstance(dirs, list) or not all(
        isinstance(d, str) and d.startswith("/") and "\n" not in d for d in dirs
    ):
        raise bad(f"{where}.dirs must be a list of absolute paths")
    if not isinstance(ready, str) or "\n" in ready:
        raise bad(f"{where}.ready must be one shell command line")
    return GuestService(name, port, run, tuple(dirs), ready)


def services_script(services: Sequence[GuestService]) -> str:
    """The lines /init runs to start the services (see start_service in guest_files/init)."""
    lines = ["# Written by coloft.lab.guest: start_service NAME PORT DIRS COMMAND READY"]
    for s in services:
        args = [s.name, str(s.port), " ".join(s.dirs), s.run, s.ready]
        lines.append("start_service " + " ".join(shlex.quote(a) for a in args))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class GuestImage:
    """The built guest: boot it with ``-kernel``/``-initrd`` and a copy of the disk."""

    kernel: Path
    initrd: Path
    disk_template: Path

    def append(self, ip_cidr: str, gateway: str | None = None) -> str:
        """The kernel command line (``-append``) for a guest at ``ip_cidr``."""
        return guest_append(ip_cidr, gateway)


def guest_append(ip_cidr: str, gateway: str | None = None) -> str:
    """Kernel command line for the lab guest, e.g. ``guest_append("192.0.2.10/24")``.

    ``ip_cidr`` must be an IPv4 address with an explicit prefix length; the
    optional ``gateway`` becomes the guest's default route.  Raises ValueError
    for anything else.
    """
    if "/" not in ip_cidr:
        raise ValueError(f"guest address needs a prefix length, e.g. 192.0.2.10/24: {ip_cidr!r}")
    try:
        iface = ipaddress.IPv4Interface(ip_cidr)
    except ValueError as exc:
        raise ValueError(f"not an IPv4 address/prefix: {ip_cidr!r}") from exc
    parts = [_APPEND_BASE, f"coloft.ip={iface.with_prefixlen}"]
    if gateway is not None:
        try:
            gw = ipaddress.IPv4Address(gateway)
        except ValueError as exc:
            raise ValueError(f"not an IPv4 gateway address: {gateway!r}") from exc
        parts.append(f"coloft.gw={gw}")
    return " ".join(parts)


def build_guest(cache_dir: Path = DEFAULT_CACHE_DIR, extra: GuestSpec | None = None) -> GuestImage:
    """Build the guest (or return the cached build) under ``cache_dir/guest``: the
    lab's base image, plus `extra`'s packages and services when given.

    Idempotent and safe to call from concurrent processes.  Raises
    :class:`GuestBuildError` naming the failed step.
    """
    try:
        return _build_guest(cache_dir, extra)
    except _StaleAptLists as exc:
        log.info("package download failed (%s); refreshing apt lists and retrying", exc)
        _apt_update()
        return _build_guest(cache_dir, extra)


# --------------------------------------------------------------------------- build


@dataclass(frozen=True)
class _Packages:
    kernel_package: str
    kernel_version: str
    busybox_version: str
    e2fsck_version: str
    extra: tuple[debs.Package, ...] = ()


def _image_in(directory: Path) -> GuestImage:
    return GuestImage(
        kernel=directory / KERNEL_NAME,
        initrd=directory / INITRD_NAME,
        disk_template=directory / DISK_NAME,
    )


def _is_complete(directory: Path) -> bool:
    names = (KERNEL_NAME, INITRD_NAME, DISK_NAME, MANIFEST_NAME)
    return all((directory / name).is_file() for name in names)


def _build_guest(cache_dir: Path, extra: GuestSpec | None) -> GuestImage:
    started = time.monotonic()
    packages = _resolve_packages(extra)
    key = _cache_key(packages, extra)
    root = cache_dir / "guest"
    final = root / key
    image = _image_in(final)
    if _is_complete(final):
        log.debug("guest image %s is cached", key)
        return image
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GuestBuildError(f"create cache dir: {root}: {exc}") from exc
    with _locked(root / ".lock"):
        if _is_complete(final):
            log.info("guest image %s was built by another process", key)
            return image
        _remove_stale(root, final)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
        try:
            _build_into(tmp, packages, key, extra)
            tmp.chmod(0o755)
            os.rename(tmp, final)
            _fsync_dir(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("guest image %s built in %.1f s", key, time.monotonic() - started)
    return image


def _remove_stale(root: Path, final: Path) -> None:
    """Called with the lock held: leftovers of interrupted builds can go."""
    for leftover in root.glob(".tmp-*"):
        log.info("removing leftover %s", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    if final.exists():  # present but incomplete: not ours to trust
        log.warning("removing incomplete %s", final)
        shutil.rmtree(final, ignore_errors=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another guest build (lock %s)", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cache_key(packages: _Packages, extra: GuestSpec | None = None) -> str:
    h = hashlib.sha256()

    def feed(label: str, data: bytes) -> None:
        h.update(f"{label}\0{len(data)}\0".encode())
        h.update(data)

    feed("builder", Path(__file__).read_bytes())
    feed("packages", Path(debs.__file__).read_bytes())
    for name in ASSET_FILES:
        feed(f"asset:{name}", _asset(name))
    feed("kernel", f"{packages.kernel_package}={packages.kernel_version}".encode())
    feed("busybox", f"{BUSYBOX_PACKAGE}={packages.busybox_version}".encode())
    feed("e2fsck", f"{E2FSCK_PACKAGE}={packages.e2fsck_version}".encode())
    feed("disk", str(DISK_SIZE_MIB).encode())
    if extra is not None:
        feed("extra", repr(extra).encode())
        for p in packages.extra:
            feed("package", f"{p.name}={p.version}".encode())
    return h.hexdigest()[:16]


def _asset(name: str) -> bytes:
    path = ASSETS_DIR / name
    try:
        return path.read_bytes()
    except OSError as exc:
        raise GuestBuildError(f"read asset: {path}: {exc}") from exc


def _build_into(out: Path, packages: _Packages, key: str, extra: GuestSpec | None) -> None:
    work = out / "work"
    work.mkdir()
    deb_dir = work / "debs"
    deb_dir.mkdir()
    kernel_deb, busybox_deb, e2fsck_deb = _download(
        deb_dir,
        [
            (packages.kernel_package, packages.kernel_version),
            (BUSYBOX_PACKAGE, packages.busybox_version),
            (E2FSCK_PACKAGE, packages.e2fsck_version),
        ],
    )

    log.info("extracting %s", kernel_deb.name)
    kroot = work / "kernel"
    _run("extract kernel package", ["dpkg-deb", "-x", str(kernel_deb), str(kroot)])
    vmlinuz = _single(kroot / "boot", "vmlinuz-*", "kernel image")
    shutil.copyfile(vmlinuz, out / KERNEL_NAME)
    moddir = _single(kroot / "lib" / "modules", "*", "module directory")
    modules, builtin = _collect_modules(moddir)

    log.info("extracting %s", busybox_deb.name)
    broot = work / "busybox"
    _run("extract busybox package", ["dpkg-deb", "-x", str(busybox_deb), str(broot)])
    busybox = broot / "bin" / "busybox"
    if not busybox.is_file():
        raise GuestBuildError(f"extract busybox package: no bin/busybox in {busybox_deb.name}")
    applets = _busybox_applets(busybox)

    log.info("extracting %s", e2fsck_deb.name)
    eroot = work / "e2fsck"
    _run("extract e2fsck package", ["dpkg-deb", "-x", str(e2fsck_deb), str(eroot)])
    e2fsck = eroot / "sbin" / "e2fsck.static"
    if not e2fsck.is_file():
        raise GuestBuildError(f"extract e2fsck package: no sbin/e2fsck.static in {e2fsck_deb.name}")

    added = _Added(work / "extra", (), "")
    if extra is not None:
        added = _unpack_extra(work, packages.extra, extra)

    log.info("writing initramfs (%d modules, %d applets)", len(modules), len(applets))
    _write_initramfs(out / INITRD_NAME, busybox, e2fsck, applets, modules, added)

    log.info("formatting %d MiB ext4 disk template", DISK_SIZE_MIB)
    _make_disk(out / DISK_NAME, DISK_SIZE_MIB)

    shutil.rmtree(work)
    manifest: dict[str, object] = {
        "key": key,
        "kernel_package": f"{packages.kernel_package}={packages.kernel_version}",
        "kernel_release": moddir.name,
        "busybox_package": f"{BUSYBOX_PACKAGE}={packages.busybox_version}",
        "e2fsck_package": f"{E2FSCK_PACKAGE}={packages.e2fsck_version}",
        "modules": [name for name, _ in modules],
        "builtin_modules": builtin,
        "disk_size_mib": DISK_SIZE_MIB,
        "service_port": SERVICE_PORT,
    }
    if extra is not None:
        manifest["guest"] = extra.name
        manifest["packages"] = [f"{p.name}={p.version}" for p in packages.extra]
        manifest["files"] = list(added.paths)
        manifest["services"] = [s.__dict__ for s in extra.services]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    for path in out.iterdir():
        path.chmod(0o644)
        with path.open("rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(out)


@dataclass(frozen=True)
class _Added:
    """Files taken from the guest's packages: paths relative to `root`."""

    root: Path
    paths: tuple[str, ...]
    services: str


def _unpack_extra(work: Path, extra: Sequence[debs.Package], spec: GuestSpec) -> _Added:
    """Download and unpack the guest's packages; pick out the named packages'
    programs and everything they load."""
    root = work / "extra"
    if not extra:  # services of busybox alone
        return _Added(root, (), services_script(spec.services))
    folder = work / "extra-debs"
    folder.mkdir()
    files = _download(folder, [(p.name, p.version) for p in extra])
    named = []
    for p, deb in zip(extra, files, strict=True):
        _run(f"extract {p.name}", ["dpkg-deb", "-x", str(deb), str(root)])
        if p.name in spec.packages:
            tree = work / "named" / p.name
            tree.mkdir(parents=True)
            _run(f"extract {p.name}", ["dpkg-deb", "-x", str(deb), str(tree)])
            named.append(tree)
    programs = debs.programs(named)
    if spec.packages and not programs:
        raise GuestBuildError(f"{spec.name}: packages {list(spec.packages)} ship no programs")
    try:
        paths = debs.needed_files(root, programs)
    except debs.PackageError as exc:
        raise GuestBuildError(f"collect programs of {list(spec.packages)}: {exc}") from exc
    log.info("guest %s: %d programs, %d files in all", spec.name, len(programs), len(paths))
    return _Added(root, tuple(paths), services_script(spec.services))


def _single(directory: Path, pattern: str, what: str) -> Path:
    found = sorted(directory.glob(pattern))
    if len(found) != 1:
        raise GuestBuildError(
            f"extract kernel package: expected one {what} matching {directory}/{pattern}, "
            f"found {[p.name for p in found]}"
        )
    return found[0]


def _normalise(module: str) -> str:
    return module.replace("-", "_")


def _module_name(filename: str) -> str | None:
    for suffix in _MODULE_SUFFIXES:
        if filename.endswith(suffix):
            return _normalise(filename[: -len(suffix)])
    return None


def _collect_modules(moddir: Path) -> tuple[list[tuple[str, bytes]], list[str]]:
    """The wanted modules' (name, uncompressed .ko bytes), and those built in."""
    files: dict[str, Path] = {}
    for path in (moddir / "kernel").rglob("*.ko*"):
        name = _module_name(path.name)
        if name is not None:
            files.setdefault(name, path)
    builtin_names: set[str] = set()
    builtin_list = moddir / "modules.builtin"
    if builtin_list.is_file():
        for line in builtin_list.read_text().splitlines():
            name = _module_name(line.strip().rsplit("/", 1)[-1])
            if name is not None:
                builtin_names.add(name)

    modules: list[tuple[str, bytes]] = []
    builtin: list[str] = []
    for wanted in MODULES:
        name = _normalise(wanted)
        found = files.get(name)
        if found is not None:
            modules.append((name, _read_module(found)))
        elif name in builtin_names:
            log.info("module %s is built into the kernel", name)
            builtin.append(name)
        else:
            raise GuestBuildError(
                f"collect modules: {wanted} is neither a module nor built in ({moddir.name})"
            )
    return modules, builtin


def _read_module(path: Path) -> bytes:
    """Module bytes, decompressed: busybox insmod cannot load compressed modules."""
    name = path.name
    try:
        if name.endswith(".ko"):
            return path.read_bytes()
        if name.endswith(".ko.xz"):
            return lzma.decompress(path.read_bytes())
        if name.endswith(".ko.gz"):
            return gzip.decompress(path.read_bytes())
    except (OSError, lzma.LZMAError, gzip.BadGzipFile) as exc:
        raise GuestBuildError(f"decompress module {path}: {exc}") from exc
    # .ko.zst: no zstd in the standard library before Python 3.14.
    return _run_bytes("decompress module", ["zstd", "-d", "-c", "-q", str(path)])


def _busybox_applets(busybox: Path) -> list[str]:
    out = _run("list busybox applets", [str(busybox), "--list-full"])
    applets = []
    for line in out.splitlines():
        line = line.strip().lstrip("/")
        if line and "/" in line and ".." not in line.split("/"):
            applets.append(line)
    if "bin/sh" not in applets:
        raise GuestBuildError("list busybox applets: busybox has no bin/sh applet")
    for needed in ("nc", "sync", "insmod", "ip", "mount", "mv", "usleep"):
        if not any(a.rsplit("/", 1)[-1] == needed for a in applets):
            raise GuestBuildError(f"list busybox applets: busybox lacks the {needed} applet")
    return applets


# --------------------------------------------------------------------------- initramfs


class _Cpio:
    """A minimal writer of the "newc" cpio format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._ino = 0
        self._names: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        if name in self._names:
            raise GuestBuildError(f"write initramfs: duplicate entry {name}")
        self._names.add(name)
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(mode) else 1,  # nlink
            0,  # mtime: reproducible output
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check
        )
        self._out += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        self._pad()
        self._out += data
        self._pad()

    def _pad(self) -> None:
        self._out += b"\0" * (-len(self._out) % 4)

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self._out)


def _write_initramfs(
    path: Path,
    busybox: Path,
    e2fsck: Path,
    applets: Sequence[str],
    modules: Sequence[tuple[str, bytes]],
    added: _Added,
) -> None:
    cpio = _Cpio()
    dirs = {"dev", "proc", "sys", "tmp", "data", "etc", "bin", "lib", "lib/modules"}
    dirs.add("lib/modules/coloft")
    links = {p for p in added.paths if (added.root / p).is_symlink()}
    # A package's program wins over a busybox applet of the same path.
    applets = [a for a in applets if a not in added.paths]
    for entry in [*applets, *added.paths]:
        parent = entry.rsplit("/", 1)[0] if "/" in entry else ""
        while parent:
            dirs.add(parent)
            parent = parent.rpartition("/")[0]
    clash = dirs & links
    if clash:
        raise GuestBuildError(f"write initramfs: {sorted(clash)} would be a directory and a link")
    for name in sorted(dirs):
        cpio.directory(name)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.file("init", _asset("init"), 0o755)
    cpio.file("handler", _asset("handler"), 0o755)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("sbin/e2fsck", e2fsck.read_bytes(), 0o755)
    cpio.file("etc/e2fsck.conf", _asset("e2fsck.conf"))
    cpio.symlink("etc/mtab", "/proc/mounts")
    for applet in sorted(set(applets)):
        if applet not in ("bin/busybox", "sbin/e2fsck"):
            cpio.symlink(applet, "/bin/busybox")
    for name, data in modules:
        cpio.file(f"lib/modules/coloft/{name}.ko", data)
    cpio.file("etc/coloft-modules", "".join(f"{name}\n" for name, _ in modules).encode())
    for entry in added.paths:
        host = added.root / entry
        if entry in links:
            cpio.symlink(entry, os.readlink(host))
        else:
            cpio.file(entry, host.read_bytes(), 0o755 if os.access(host, os.X_OK) else 0o644)
    if added.services:
        cpio.file("etc/coloft-services", added.services.encode())
    data = cpio.finish()
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(data)


def _make_disk(path: Path, size_mib: int) -> None:
    with path.open("wb") as f:
        f.truncate(size_mib * 1024 * 1024)
    _run(
        "format disk template",
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "coloft-data",
            "-O",
            "^metadata_csum,^has_journal",
            "-N",
            str(DISK_INODES),
            # Initialise everything now: no ext4lazyinit writes in the guest.
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,nodiscard,root_owner=0:0",
            str(path),
        ],
    )


# --------------------------------------------------------------------------- apt


def _apt_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(LC_ALL="C", LANG="C", DEBIAN_FRONTEND="noninteractive")
    return env


def _resolve_packages(extra: GuestSpec | None = None) -> _Packages:
    try:
        found = _lookup_packages()
    except GuestBuildError as exc:
        log.info("apt lookup failed (%s); running apt-get update", exc)
        _apt_update()
        found = _lookup_packages()
    if extra is None or not extra.packages:
        return found
    try:
        closure = debs.closure(extra.packages, _show)
    except debs.PackageError as exc:
        raise GuestBuildError(f"guest {extra.name}: {exc}") from exc
    return _Packages(
        found.kernel_package,
        found.kernel_version,
        found.busybox_version,
        found.e2fsck_version,
        tuple(sorted(closure, key=lambda p: p.name)),
    )


def _show(names: Sequence[str]) -> dict[str, debs.Package]:
    """The candidate version of each name apt knows (virtual names are left out)."""
    if not names:
        return {}
    argv = ["apt-cache", "show", "--no-all-versions", *names]
    try:
        return debs.parse_stanzas(_run("look up guest packages", argv))
    except GuestBuildError:
        if len(names) == 1:
            return {}
        found: dict[str, debs.Package] = {}
        for name in names:  # one of them is virtual or unknown: ask one by one
            found.update(_show([name]))
        return found


def _apt_update() -> None:
    _run("apt-get update", ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=300", "update"])


def _lookup_packages() -> _Packages:
    # One apt-cache call (each costs ~0.5 s): the kernel meta package pins the
    # versioned kernel package exactly, e.g. "linux-image-6.1.0-56-amd64 (= 6.1.192-2)".
    out = _run(
        "look up packages",
        [
            "apt-cache",
            "show",
            "--no-all-versions",
            KERNEL_META_PACKAGE,
            BUSYBOX_PACKAGE,
            E2FSCK_PACKAGE,
        ],
    )
    stanzas: dict[str, dict[str, str]] = {}
    for block in re.split(r"\n\s*\n", out):
        fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", block, re.M))
        if "Package" in fields:
            stanzas.setdefault(fields["Package"], fields)
    meta = stanzas.get(KERNEL_META_PACKAGE, {})
    busybox = stanzas.get(BUSYBOX_PACKAGE, {})
    e2fsck = stanzas.get(E2FSCK_PACKAGE, {})
    match = re.search(
        r"(?:^|,)\s*(linux-image-[0-9]\S*-amd64)(?:\s*\(=\s*([^)\s]+)\s*\))?",
        meta.get("Depends", ""),
    )
    if match is None or "Version" not in busybox or "Version" not in e2fsck:
        raise GuestBuildError(
            f"look up packages: no linux-image-*-amd64 dependency of {KERNEL_META_PACKAGE}, "
            f"or no {BUSYBOX_PACKAGE} or {E2FSCK_PACKAGE} version in apt-cache output: "
            f"{out.strip()[:500]!r}"
        )
    kernel_package, kernel_version = match.group(1), match.group(2)
    if kernel_version is None:
        kernel_version = _candidate_version(kernel_package)
    return _Packages(
        kernel_package=kernel_package,
        kernel_version=kernel_version,
        busybox_version=busybox["Version"],
        e2fsck_version=e2fsck["Version"],
    )


def _candidate_version(package: str) -> str:
    out = _run(f"look up {package}", ["apt-cache", "show", "--no-all-versions", package])
    match = re.search(r"^Version:\s*(\S+)\s*$", out, re.M)
    if match is None:
        raise GuestBuildError(f"look up {package}: no Version in apt-cache show output")
    return match.group(1)


def _download(directory: Path, wanted: Sequence[tuple[str, str]]) -> list[Path]:
    """apt-get download of each (package, version), in one call; the .deb files in order."""
    log.info("downloading %s", ", ".join(f"{n}={v}" for n, v in wanted))
    # The temporary directory is private to root; don't try to drop to _apt.
    argv = ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download"]
    argv += [f"{n}={v}" for n, v in wanted]
    try:
        _run(f"download {', '.join(n for n, _ in wanted)}", argv, cwd=directory)
    except GuestBuildError as exc:
        raise _StaleAptLists(str(exc)) from exc
    files = []
    for name, _ in wanted:
        found = sorted(directory.glob(f"{name}_*.deb"))
        if len(found) != 1:
            raise GuestBuildError(f"download {name}: expected one .deb, found {found}")
        files.append(found[0])
    return files


# --------------------------------------------------------------------------- processes


def _which(program: str) -> str:
    """`program` from PATH, else from the sbin directories a non-root PATH may lack."""
    if "/" in program:
        return program
    found = shutil.which(program)
    if found is None:
        found = shutil.which(program, path="/usr/local/sbin:/usr/sbin:/sbin")
    return found or program


def _run_bytes(step: str, argv: Sequence[str], cwd: Path | None = None) -> bytes:
    log.debug("%s: %s", step, " ".join(argv))
    command = [_which(argv[0]), *argv[1:]]
    try:
        done = subprocess.run(command, cwd=cwd, env=_apt_env(), check=True, capture_output=True)
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{step}: command not found: {argv[0]}") from exc
    except subprocess.CalledProcessError as exc:
        stderr = exc.stderr.decode(errors="replace").strip() if exc.stderr else ""
        raise GuestBuildError(
            f"{step}: {' '.join(argv)} exited with {exc.returncode}: {stderr}"
        ) from exc
    return done.stdout


def _run(step: str, argv: Sequence[str], cwd: Path | None = None) -> str:
    return _run_bytes(step, argv, cwd).decode(errors="replace")


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m coloft.lab.guest",
        description="Build (or find cached) the coloft lab guest and print its paths as JSON.",
    )
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument(
        "--spec", type=Path, help="a guest file (packages, services): examples/guests/*.toml"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        extra = None if args.spec is None else load_guest_spec(args.spec)
        image = build_guest(args.cache_dir, extra)
    except GuestBuildError as exc:
        print(f"guest build failed: {exc}", file=sys.stderr)
        return 1
    paths = {
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "disk_template": str(image.disk_template),
    }
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    # Run the imported module's main so that log records carry its real name.
    from coloft.lab.guest import main as _main

    sys.exit(_main())
