"""The lab guest's kernel command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from coloft.lab.guest import SERVICE_PORT, GuestImage, guest_append

BASE = "console=ttyS0 ipv6.disable=1 panic=-1 quiet"


def test_append_carries_the_guest_address() -> None:
    assert guest_append("192.0.2.10/24") == f"{BASE} coloft.ip=192.0.2.10/24"


def test_append_with_gateway() -> None:
    assert guest_append("192.0.2.10/24", "192.0.2.1") == (
        f"{BASE} coloft.ip=192.0.2.10/24 coloft.gw=192.0.2.1"
    )


def test_append_normalises_the_address() -> None:
    assert guest_append(" 192.0.2.10/24 ".strip()) == f"{BASE} coloft.ip=192.0.2.10/24"
    assert guest_append("192.0.2.10/255.255.255.0") == f"{BASE} coloft.ip=192.0.2.10/24"


@pytest.mark.parametrize(
    "bad",
    ["192.0.2.10", "192.0.2.10/33", "2001:db8::1/64", "192.0.2.300/24", "", "x/24", "1.2.3.4/24 x"],
)
def test_append_rejects_bad_addresses(bad: str) -> None:
    with pytest.raises(ValueError):
        guest_append(bad)


def test_append_rejects_bad_gateway() -> None:
    with pytest.raises(ValueError):
        guest_append("192.0.2.10/24", "192.0.2.1/24")


def test_image_append_is_guest_append() -> None:
    image = GuestImage(kernel=Path("k"), initrd=Path("i"), disk_template=Path("d"))
    assert image.append("192.0.2.10/24") == guest_append("192.0.2.10/24")


def test_service_port() -> None:
    assert SERVICE_PORT == 7000
