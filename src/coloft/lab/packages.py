"""Programs from Debian packages, with the shared libraries they load, for the guest.

A guest names packages (``redis-server``); the builder downloads each with its
direct dependencies (a program may be a symlink into one: ``redis-server`` points
at ``redis-check-rdb`` in ``redis-tools``) and, transitively, every library package
(``lib*`` or in section ``libs``, like ``zlib1g``) they depend on.
Maintainer-script helpers (``adduser``, ``lsb-base``) come along only as direct
dependencies and are never copied unless a program needs them. From the unpacked
tree it takes the named packages' programs and the closure of their ELF interpreter
and ``DT_NEEDED`` libraries, found the way the dynamic loader finds them; a library
no package ships is a build error naming it.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

PROGRAM_DIRS = ("usr/bin", "usr/sbin", "bin", "sbin")
# Where Debian's loader looks when no ld.so.cache exists (multiarch first).
LIBRARY_DIRS = (
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib64",
    "lib",
    "usr/lib",
)
MAX_SYMLINKS = 16


class PackageError(Exception):
    """A package or a library could not be resolved; the message names it."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    depends: tuple[str, ...]
    section: str = ""

    @property
    def library(self) -> bool:
        # zlib1g is a library outside the lib* names; its section says so.
        return self.name.startswith("lib") or self.section.rsplit("/", 1)[-1] in (
            "libs",
            "oldlibs",
        )


def parse_stanzas(text: str) -> dict[str, Package]:
    """`apt-cache show` output -> package by name (first stanza of each name wins)."""
    found: dict[str, Package] = {}
    for block in re.split(r"\n\s*\n", text):
        fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", block, re.M))
        name, version = fields.get("Package"), fields.get("Version")
        if not name or not version or name in found:
            continue
        deps = ", ".join(f for f in (fields.get("Pre-Depends"), fields.get("Depends")) if f)
        section = fields.get("Section", "")
        found[name] = Package(name, version, tuple(first_choices(deps)), section)
    return found


def first_choices(depends: str) -> list[str]:
    """Names in a Depends field, each alternative group as its first name:
    ``libc6 (>= 2.34), a | b, perl:any`` -> ``["libc6", "a", "perl"]``."""
    names = []
    for group in depends.split(","):
        first = group.split("|")[0].strip()
        if first:
            names.append(re.split(r"[\s(:]", first, maxsplit=1)[0])
    return names


def closure(
    named: Sequence[str], show: Callable[[Sequence[str]], dict[str, Package]]
) -> list[Package]:
    """The packages to download for `named`: those, their direct dependencies and
    every library package reachable from them. `show` looks packages up (apt-cache);
    a named package it does not know is an error, a dependency it does not know
    (a virtual package) is skipped: its files are found through the library search."""
    known = show(list(named))
    missing = [n for n in named if n not in known]
    if missing:
        raise PackageError(f"no such package in the apt sources: {', '.join(missing)}")
    chosen: dict[str, Package] = {n: known[n] for n in named}
    level = {d for n in named for d in known[n].depends}
    direct = True
    while level:
        fresh = sorted(d for d in level if d not in chosen)
        found = show(fresh) if fresh else {}
        if not direct:
            found = {n: p for n, p in found.items() if p.library}
        direct = False
        chosen.update(found)
        level = {d for p in found.values() for d in p.depends}
    return list(chosen.values())


# --------------------------------------------------------------------------- ELF


@dataclass(frozen=True)
class Dynamic:
    interpreter: str | None
    needed: tuple[str, ...]
    runpath: tuple[str, ...]


def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def read_dynamic(data: bytes, what: str = "file") -> Dynamic:
    """Interpreter, DT_NEEDED and DT_RUNPATH/DT_RPATH of a 64-bit little-endian ELF."""
    if not is_elf(data) or data[4] != 2 or data[5] != 1:
        raise PackageError(f"{what}: not a 64-bit little-endian ELF file")
    try:
        (phoff,) = struct.unpack_from("<Q", data, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
        segments = [
            struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize) for i in range(phnum)
        ]
        interp = None
        loads = []
        dynamic = None
        for p_type, _flags, offset, vaddr, _pa, filesz, _memsz, _align in segments:
            if p_type == 3:  # PT_INTERP
                interp = data[offset : offset + filesz].split(b"\0")[0].decode()
            elif p_type == 1:  # PT_LOAD
                loads.append((vaddr, offset, filesz))
            elif p_type == 2:  # PT_DYNAMIC
                dynamic = (offset, filesz)
        if dynamic is None:
            return Dynamic(interp, (), ())
        entries = []
        strtab = None
        for pos in range(dynamic[0], dynamic[0] + dynamic[1], 16):
            tag, value = struct.unpack_from("<qQ", data, pos)
            if tag == 0:
                break
            if tag == 5:  # DT_STRTAB (an address)
                strtab = value
            entries.append((tag, value))
        if strtab is None:
            raise PackageError(f"{what}: dynamic section without a string table")
        base = next(
            (off + strtab - va for va, off, size in loads if va <= strtab < va + size), None
        )
        if base is None:
            raise PackageError(f"{what}: string table outside every loaded segment")

        def string(index: int) -> str:
            end = data.index(b"\0", base + index)
            return data[base + index : end].decode()

        needed = tuple(string(v) for t, v in entries if t == 1)
        paths = [string(v) for t, v in entries if t in (15, 29)]  # DT_RPATH, DT_RUNPATH
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise PackageError(f"{what}: malformed ELF file ({exc})") from exc
    runpath = tuple(d for p in paths for d in p.split(":") if d)
    return Dynamic(interp, needed, runpath)


# --------------------------------------------------------------------------- tree


def resolve(root: Path, path: str) -> list[str]:
    """`path` inside the unpacked tree `root`, following symlinks without ever leaving
    it: the symlinks met on the way (all needed in the image), the real file last."""
    chain: list[str] = []
    done: list[str] = []
    parts = list(PurePosixPath(path.lstrip("/")).parts)
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        if part in ("", ".", "/"):
            continue
        here = root.joinpath(*done, part)
        if here.is_symlink():
            hops += 1
            if hops > MAX_SYMLINKS:
                raise PackageError(f"{path}: more than {MAX_SYMLINKS} symlinks")
            chain.append("/".join([*done, part]))
            target = PurePosixPath(os.readlink(here))
            if target.is_absolute():
                done = []
            parts = [*target.parts, *parts]
            continue
        done.append(part)
    real = "/".join(done)
    if not root.joinpath(*done).is_file():
        raise FileNotFoundError(real)
    chain.append(real)
    return chain


def programs(trees: Iterable[Path]) -> list[str]:
    """The program paths (relative) that the named packages' unpacked trees ship."""
    found: set[str] = set()
    for tree in trees:
        for d in PROGRAM_DIRS:
            directory = tree / d
            if directory.is_dir():
                found.update(f"{d}/{p.name}" for p in directory.iterdir())
    return sorted(found)


def needed_files(root: Path, wanted: Sequence[str]) -> list[str]:
    """Every path (relative to `root`) the programs `wanted` need: themselves, the
    symlinks on their way, their ELF interpreters and libraries, transitively."""
    out: dict[str, None] = {}
    todo: list[tuple[str, str]] = [(w, w) for w in wanted]
    seen: set[str] = set()
    while todo:
        path, why = todo.pop()
        try:
            chain = resolve(root, path)
        except FileNotFoundError as exc:
            raise PackageError(f"{why} needs {path}, which none of the packages ships") from exc
        out.update(dict.fromkeys(chain))
        real = chain[-1]
        if real in seen:
            continue
        seen.add(real)
        data = (root / real).read_bytes()
        if not is_elf(data):
            continue  # a script: its interpreter must be named as a package of its own
        dyn = read_dynamic(data, real)
        if dyn.interpreter:
            todo.append((dyn.interpreter, real))
        origin = str(PurePosixPath("/" + real).parent)
        dirs = [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for d in dyn.runpath]
        for soname in dyn.needed:
            todo.append((_library(root, soname, [*dirs, *LIBRARY_DIRS]), real))
    return list(out)


def _library(root: Path, soname: str, dirs: Sequence[str]) -> str:
    for d in dirs:
        candidate = f"{d.strip('/')}/{soname}"
        try:
            resolve(root, candidate)
        except FileNotFoundError:
            continue
        return candidate
    return f"{LIBRARY_DIRS[0]}/{soname}"  # not found: the caller names it
