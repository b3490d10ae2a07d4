"""Process pods never share a port: a port the kernel offers again before the first pod bound it
(it picks free ports at random) is not handed to a second pod. Pure; the kernel's offers are
given in order."""

from __future__ import annotations

import pytest

from hms_mgmt.runtimes.base import PodRuntimeError
from hms_mgmt.runtimes.process import PortPicker, _free_port


def offers(*ports: int):
    it = iter(ports)
    return lambda address: next(it)


def test_a_port_offered_again_is_not_handed_out_twice() -> None:
    picker = PortPicker(free=offers(41001, 41001, 41001, 41003))
    assert picker.take("127.0.0.1") == 41001
    assert picker.take("127.0.0.1") == 41003  # the kernel offered 41001 twice more meanwhile


def test_the_same_port_on_another_address_is_another_endpoint() -> None:
    picker = PortPicker(free=offers(41001, 41001))
    assert picker.take("127.0.0.1") == 41001
    assert picker.take("10.0.0.2") == 41001


def test_a_port_is_given_again_once_held_long_enough() -> None:
    picker = PortPicker(hold_s=0.0, free=offers(41001, 41001))
    assert picker.take("127.0.0.1") == 41001
    assert picker.take("127.0.0.1") == 41001


def test_no_distinct_port_is_a_clear_error() -> None:
    picker = PortPicker(free=offers(*[41001] * 6))
    picker.take("127.0.0.1")
    with pytest.raises(PodRuntimeError, match="no free port on 127.0.0.1 after 5 tries"):
        picker.take("127.0.0.1", tries=5)


def test_real_ports_from_the_kernel_are_distinct() -> None:
    picker = PortPicker()
    ports = [picker.take("127.0.0.1") for _ in range(300)]
    assert len(set(ports)) == 300 and all(p > 0 for p in ports)
    assert _free_port("127.0.0.1") > 0
