"""The trailer attack and the request-id rule on both engines, as a caller reaches a router
started as ``hms router`` starts it (router_helpers.routed): a trailer cannot make the next
request on a connection (another caller's, through a shared front proxy) go to this request's
service, glued onto its path; nor can it reach the pod. An X-Request-Id is kept when it is one
(1..128 bytes) and replaced otherwise, the same on both."""

from __future__ import annotations

import asyncio
import json

import httptools
import pytest
from router_helpers import RawPodServer, engine, push_table, read_answer, routed  # noqa: F401 - fixtures

from hms_mgmt.models import Endpoint

pytestmark = pytest.mark.timeout(120)


class EchoingPod(RawPodServer):
    """Answers each whole request with its path, headers and body as JSON; keeps every byte it got."""

    def __init__(self) -> None:
        super().__init__()
        self.got = bytearray()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pod = self

        class Parse:
            url, headers, body = b"", [], b""

            def on_url(self, url: bytes) -> None:
                self.url += url

            def on_header(self, name: bytes, value: bytes) -> None:
                self.headers.append([name.decode("latin-1").lower(), value.decode("latin-1")])

            def on_body(self, body: bytes) -> None:
                self.body += body

            def on_message_complete(self) -> None:
                data = json.dumps({"path": self.url.decode("latin-1"), "headers": self.headers,
                                   "body": self.body.decode("latin-1")}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
                self.url, self.headers, self.body = b"", [], b""

        parser = httptools.HttpRequestParser(Parse())
        while data := await reader.read(65536):
            pod.got += data
            parser.feed_data(data)
            await writer.drain()


async def test_a_trailer_sends_no_other_request_to_this_service(routed):  # noqa: F811
    svc, other = EchoingPod(), EchoingPod()
    try:
        await push_table(routed, routed.settings.state_dir, "svc", [Endpoint(pod="svc-1", address=await svc.start())])
        await push_table(routed, routed.settings.state_dir, "other",
                         [Endpoint(pod="other-1", address=await other.start())])
        reader, writer = await asyncio.open_connection("127.0.0.1", routed.port)
        writer.write(b"POST /svc/comments?text= HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"7\r\nstolen=\r\n0\r\nUpgrade: h2c\r\nAuthorization: Bearer from-trailer\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(b"POST /other/login HTTP/1.1\r\nHost: a\r\nCookie: session=VICTIM\r\n"
                     b"Content-Length: 17\r\n\r\npassword=hunter2!")
        first, second = await read_answer(reader), await read_answer(reader)
        writer.close()
        assert first.status == 200 and first.headers["x-hms-pod"] == "svc-1", first.body
        assert second.status == 200 and second.headers["x-hms-pod"] == "other-1", second.body
        assert second.json()["path"] == "/login" and second.json()["body"] == "password=hunter2!"
        assert b"VICTIM" not in svc.got and b"/other/login" not in svc.got, bytes(svc.got)
        assert b"from-trailer" not in bytes(svc.got).split(b"\r\n\r\n", 1)[0]  # no header of the pod's request
    finally:
        svc.close()
        other.close()


async def test_a_request_id_is_kept_when_it_is_one_and_replaced_otherwise(routed):  # noqa: F811
    pod = EchoingPod()
    try:
        await push_table(routed, routed.settings.state_dir, "ids", [Endpoint(pod="ids-1", address=await pod.start())])
        for sent, kept in (("req-42", True), ("i" * 128, True), ("x" * 200, False)):
            reader, writer = await asyncio.open_connection("127.0.0.1", routed.port)
            writer.write(b"GET /ids/ HTTP/1.1\r\nHost: a\r\nX-Request-Id: %s\r\n\r\n" % sent.encode())
            got = await read_answer(reader)
            writer.close()
            seen = dict(got.json()["headers"])["x-request-id"]
            assert (seen == sent) == kept and got.headers["x-request-id"] == seen, (routed.engine, sent, seen)
            assert 0 < len(seen) <= 128
    finally:
        pod.close()
