"""The builtin data path's pure parts: which of a pod's answer headers pass on, its length."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router import http1
from router.http1 import host_port, relayed_headers, status_line

HEAD = (b"Server: nginx\r\nDate: Sat, 05 Dec 2026 12:00:00 GMT\r\nContent-Type: application/json\r\n"
        b"content-length : 42\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-HMS-Pod: spoofed\r\n"
        b"x-request-id: theirs\r\nTE: trailers\r\nTez: kept\r\nTransfer-Encoding: chunked\r\nX-Upgraded: no\r\n")


def test_hop_by_hop_framing_and_our_headers_are_dropped_the_rest_kept_as_sent():
    kept, length = relayed_headers(HEAD)
    assert kept == (b"Server: nginx\r\nDate: Sat, 05 Dec 2026 12:00:00 GMT\r\n"
                    b"Content-Type: application/json\r\nTez: kept\r\nX-Upgraded: no\r\n")
    assert length == b"42"
    assert relayed_headers(b"X-Content-Length: 7\r\n") == (b"X-Content-Length: 7\r\n", None)


def test_the_first_length_counts_and_bare_line_feeds_become_crlf():
    kept, length = relayed_headers(b"Content-Length: 5\nServer: x\nCONTENT-LENGTH: 6\nX-A: a:b\n")
    assert (kept, length) == (b"Server: x\r\nX-A: a:b\r\n", b"5")
    assert relayed_headers(b"") == (b"", None)


def test_addresses_and_status_lines():
    assert host_port("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert host_port("[::1]:9") == ("::1", 9)
    assert status_line(502) == b"HTTP/1.1 502 Bad Gateway\r\n"
    assert status_line(599) == b"HTTP/1.1 599 Unknown\r\n"


HEADER_LINE = st.builds(lambda n, v: b"%s: %s\r\n" % (n, v),
                        st.sampled_from([b"Date", b"Server", b"Content-Length", b"X-Request-Id", b"X-HMS-Pod",
                                         b"Set-Cookie", b"Connection", b"X-Big"]),
                        st.binary(min_size=0, max_size=700).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))


@given(st.lists(st.lists(HEADER_LINE, max_size=6).map(b"".join), min_size=1, max_size=8))
def test_a_kept_answer_is_the_one_for_that_very_block(blocks: list[bytes]) -> None:
    """The answers kept per header block (a pod repeats its block) are those of the block asked
    for, in any order, long blocks included (those are not kept)."""
    for block in blocks + blocks[::-1]:
        assert relayed_headers(block) == http1._relayed_headers(block)


def test_the_kept_answers_are_bounded() -> None:
    for i in range(3 * http1._RELAYED_CACHE_MAX):
        relayed_headers(b"Date: %d\r\n" % i)
    assert len(http1._RELAYED_CACHE) <= http1._RELAYED_CACHE_MAX
    relayed_headers(b"X-Big: " + b"a" * http1._RELAYED_CACHE_BLOCK + b"\r\n")
    assert not any(len(k) > http1._RELAYED_CACHE_BLOCK for k in http1._RELAYED_CACHE)


def test_an_answer_is_chunked_only_if_chunked_is_its_last_transfer_coding() -> None:
    """Else, without a Content-Length, the answer ends with the pod's connection (RFC 9112 6.3)."""
    assert http1._chunked(b"Server: x\r\nTransfer-Encoding: chunked\r\n")
    assert http1._chunked(b"transfer-encoding : gzip, Chunked\r\n")
    assert http1._chunked(b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n")
    assert not http1._chunked(b"Server: x\r\nContent-Type: text/plain\r\n")
    assert not http1._chunked(b"Transfer-Encoding: chunked, gzip\r\n")
    assert not http1._chunked(b"X-Transfer-Encoding: chunked\r\n")
    assert not http1._chunked(b"")


@pytest.mark.parametrize(("target", "origin"), [
    ("http://router:8000/hms-ach/pay?x=1", "/hms-ach/pay?x=1"),
    ("HTTP://10.0.0.1/hms-ach", "/hms-ach"),
    ("http://router:8000", "/"),
    ("http://router:8000?q", "/?q"),
    ("*", "*"),
    ("router:443", "router:443"),
])
def test_an_absolute_form_target_is_served_as_its_path(target, origin):
    assert http1.origin_form(target) == origin
