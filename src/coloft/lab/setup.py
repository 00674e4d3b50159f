"""`coloft lab up`: namespaces, the guest image, one disk copy per lab host and the
replication certificates.

The files land at fixed paths under LAB_DIR so that examples/lab.toml works as is.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from coloft.config.load import load_spec
from coloft.effects import certs
from coloft.errors import FatalError
from coloft.lab import guest, net
from coloft.model.spec import PairSpec

LAB_DIR = Path(os.environ.get("COLOFT_LAB_DIR", "/var/lib/coloft/lab"))
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
EXAMPLE_SPEC = EXAMPLES / "lab.toml"
NODES = ("a", "b")


def guest_file(name: str) -> Path:
    """examples/guests/NAME.toml: a guest with packages and services of its own."""
    return EXAMPLES / "guests" / f"{name}.toml"


def guest_image(name: str) -> guest.GuestImage:
    """Build (or find) the lab guest with `name`'s packages; its kernel and initrd are
    linked as LAB_DIR/vmlinuz-NAME and initrd-NAME.gz for lab_spec(guest=NAME)."""
    try:
        image = guest.build_guest(extra=guest.load_guest_spec(guest_file(name)))
    except guest.GuestBuildError as e:
        raise FatalError(str(e)) from e
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    _link(image.kernel, LAB_DIR / f"vmlinuz-{name}")
    _link(image.initrd, LAB_DIR / f"initrd-{name}.gz")
    return image


def _link(target: Path, link: Path) -> None:
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)


def reset_disks(image: guest.GuestImage | None = None) -> None:
    """Give every lab host a fresh copy of the empty guest disk."""
    image = image or guest.build_guest()
    for node in NODES:
        _fresh_disk(image.disk_template, LAB_DIR / f"disk-{node}.raw")


def _fresh_disk(template: Path, dst: Path) -> None:
    tmp = dst.with_suffix(".tmp")
    shutil.copyfile(template, tmp)
    tmp.replace(dst)


def lab_up(fresh_disks: bool = False) -> Path:
    """Idempotent; returns the example spec that runs on this lab."""
    try:
        net.lab_up()
        image = guest.build_guest()
    except (net.LabError, guest.GuestBuildError) as e:
        raise FatalError(str(e)) from e
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    _link(image.kernel, LAB_DIR / "vmlinuz")
    _link(image.initrd, LAB_DIR / "initrd.gz")
    _link(image.disk_template, LAB_DIR / "disk.raw")
    if fresh_disks or not all((LAB_DIR / f"disk-{n}.raw").exists() for n in NODES):
        reset_disks(image)
    spec = load_spec(EXAMPLE_SPEC)
    certs.make(spec, spec.certs_dir())
    return EXAMPLE_SPEC


def _set(text: str, key: str, value: str) -> str:
    changed, n = re.subn(rf"(?m)^{key} = \S+", f"{key} = {value}", text)
    if n != 1:
        raise FatalError(f"{EXAMPLE_SPEC}: no single {key} line to set")
    return changed


def lab_spec(
    interval_ms: int = 2000,
    reprotect: bool = True,
    memory_mib: int = 128,
    max_queue_size: int = 1024,
    checkpoint_at_start: bool = True,
    tls: bool = True,
    guest: str | None = None,
    spare_after_s: float | None = None,
) -> PairSpec:
    """examples/lab.toml with the given checkpoint interval, re-protection on or off,
    guest memory, colo-compare queue length and TLS on or off, the guest of
    examples/guests/GUEST.toml instead of the plain one, and host c as the spare node
    taken after `spare_after_s`, as a file of its own (agents read the spec from its
    file); the lab must be up to run it."""
    text = _set(EXAMPLE_SPEC.read_text(), "checkpoint_interval_ms", str(interval_ms))
    text = _set(text, "auto", "true" if reprotect else "false")
    text = _set(text, "memory_mib", str(memory_mib))
    text = _set(text, "max_queue_size", str(max_queue_size))
    text = _set(text, "checkpoint_at_start", "true" if checkpoint_at_start else "false")
    text = _set(text, "replication", '"required"' if tls else '"off"')
    if guest is not None:
        guest_image(guest)
        text = _set(text, "kernel", f'"{LAB_DIR}/vmlinuz-{guest}"')
        text = _set(text, "initrd", f'"{LAB_DIR}/initrd-{guest}.gz"')
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    if spare_after_s is not None:
        disk = LAB_DIR / "disk-c.raw"
        _fresh_disk(LAB_DIR / "disk.raw", disk)
        text = _set(text, "spare_after_s", f"{spare_after_s:g}")
        text = 'spare = "c"\n' + text.replace("[tuning]", _node_table("c", 9000, disk) + "[tuning]")
    tag = f"{interval_ms}ms-{memory_mib}m-q{max_queue_size}"
    tag += "" if guest is None else f"-{guest}"
    tag += ("" if reprotect else "-noreprotect") + ("" if checkpoint_at_start else "-late")
    tag += "" if tls else "-plain"
    tag += "" if spare_after_s is None else f"-spare{spare_after_s:g}"
    path = LAB_DIR / f"lab-{tag}.toml"
    path.write_text(text)
    spec = load_spec(path)
    if spec.spare is not None:
        certs.make(spec, spec.certs_dir())  # the spare's certificate too
    return spec


def _node_table(host: str, port_base: int, disk: Path) -> str:
    i = "abc".index(host) + 1
    return (
        f"[nodes.{host}]\n"
        f'netns = "{net.HOST_NS[host]}"\n'
        f'replication_address = "{net.REPLICATION_IP[host]}"\n'
        f'bridge = "{net.VM_BRIDGE}"\n'
        f"port_base = {port_base}\n"
        f'disk = "{disk}"\n'
        f'lan_address = "192.0.2.{i}"\n\n'
    )


def fleet_specs(
    count: int,
    hosts: tuple[str, ...] = ("a", "b"),
    interval_ms: int = 2000,
    memory_mib: int = 128,
    stacked: bool = False,
) -> list[PairSpec]:
    """`count` pairs on the lab's `hosts`, placed around them as a ring: pair i is VM
    "vmI" at 192.0.2.(20+i), primary on hosts[i] and secondary on the next host, with
    ports from 9000 + 10*i and disks of its own. With three pairs on three hosts each
    host is primary of one pair and secondary of another. `stacked`: every pair has
    its primary on hosts[0] and its secondary on hosts[1]."""
    if not 1 <= count <= 9 or len(hosts) < 2 or not set(hosts) <= set(net.HOST_NS):
        raise FatalError(f"a lab fleet has 1 to 9 pairs on 2 or 3 of a, b, c: {count} on {hosts}")
    base = EXAMPLE_SPEC.read_text()
    head, rest = base.split("[nodes.a]", 1)
    tail = rest[rest.index("[tuning]") :]
    specs = []
    for i in range(count):
        ip = f"192.0.2.{20 + i}"
        first = 0 if stacked else i % len(hosts)
        place = (hosts[first], hosts[(first + 1) % len(hosts)])
        text = head
        for old, new in (
            ('name = "demo"', f'name = "vm{i}"'),
            ("coloft.ip=192.0.2.10/24", f"coloft.ip={ip}/24"),
            ('mac = "52:54:00:c0:10:0a"', f'mac = "52:54:00:c0:10:{0x20 + i:02x}"'),
            ('service = "192.0.2.10:7000"', f'service = "{ip}:7000"'),
            ('primary = "a"', f'primary = "{place[0]}"'),
        ):
            if old not in text:
                raise FatalError(f"{EXAMPLE_SPEC}: no {old!r} to change for the fleet")
            text = text.replace(old, new)
        for host in place:
            disk = LAB_DIR / f"disk-{host}-vm{i}.raw"
            if not disk.exists():
                _fresh_disk(LAB_DIR / "disk.raw", disk)
            text += _node_table(host, 9000 + 10 * i, disk)
        text = _set(text + tail, "checkpoint_interval_ms", str(interval_ms))
        text = _set(text, "memory_mib", str(memory_mib))
        path = LAB_DIR / f"fleet-vm{i}.toml"
        path.write_text(text)
        spec = load_spec(path)
        certs.make(spec, spec.certs_dir())
        specs.append(spec)
    return specs


def reset_fleet_disks(specs: list[PairSpec]) -> None:
    for spec in specs:
        for node in spec.nodes:
            _fresh_disk(LAB_DIR / "disk.raw", spec.disk_of(node))
