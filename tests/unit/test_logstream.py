"""The pure parts of the log stream: lines cut from chunks, a file's tail, a file followed as
it grows (a real file, written while it is read), and the node's check of a log grant."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from hms_mgmt import logstream, tickets
from hms_mgmt.errors import AccessDenied, HmsError
from hms_mgmt.runtimes.follow import FileFollow, LineSplitter, StreamFollow, read_tail
from hms_mgmt.wire import LogEndpoint, LogGrantOutput

POD_A = "11111111-1111-4111-8111-111111111111"
POD_B = "22222222-2222-4222-8222-222222222222"


def test_lines_are_cut_at_newlines_and_a_partial_line_waits():
    split = LineSplitter()
    assert split.feed(b"one\ntw") == ["one"]
    assert split.feed(b"o\r\nthree\n\xff\n") == ["two", "three", "\ufffd"]
    assert split.feed(b"four") == []
    assert split.flush() == ["four"] and split.flush() == []


def test_the_tail_is_whole_lines_and_ends_before_a_line_being_written(tmp_path: Path):
    log = tmp_path / "pod.log"
    log.write_bytes(b"".join(f"line {i}\n".encode() for i in range(10)) + b"half")
    lines, offset = read_tail(log, 3)
    assert lines == ["line 7", "line 8", "line 9"]
    assert log.read_bytes()[offset:] == b"half"
    assert read_tail(log, 0)[0] == [f"line {i}" for i in range(10)]


def test_a_followed_file_shows_new_lines_then_ends_once_the_pod_stops(tmp_path: Path):
    log = tmp_path / "pod.log"
    log.write_bytes(b"old 1\nold 2\n")
    running = threading.Event()
    running.set()
    follow = FileFollow(log, 1, running.is_set)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(follow))
    reader.start()
    with open(log, "ab") as f:
        f.write(b"new 1\nnew ")
        f.flush()
        deadline = time.monotonic() + 10
        while "new 1" not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
        f.write(b"2\nlast words")
    running.clear()
    reader.join(10)
    assert not reader.is_alive()
    assert seen == ["old 2", "new 1", "new 2", "last words"]


def test_a_closed_follow_ends_while_its_pod_still_runs(tmp_path: Path):
    log = tmp_path / "pod.log"
    log.write_bytes(b"")
    follow = FileFollow(log, 10, lambda: True)
    reader = threading.Thread(target=lambda: list(follow))
    reader.start()
    follow.close()
    reader.join(5)
    assert not reader.is_alive()


def test_a_stream_follow_splits_chunks_and_close_closes_the_stream():
    closed = []
    follow = StreamFollow([b"a\nb", b"c\n", b"tail"], lambda: closed.append(True))
    assert list(follow) == ["a", "bc", "tail"]
    follow.close()
    assert closed == [True]


@pytest.fixture
def plane(tmp_path: Path) -> Path:
    tickets.ensure_control_key(tmp_path)
    return tmp_path


def log_grant(state: Path, pods: list[str], key_hash: str, **claims: object) -> str:
    now = int(time.time())
    return tickets.sign_claims(state, {"typ": "grant", "act": "logs", "svc": "hms-ach", "sub": "vic", "role": "viewer",
                                       "bind": logstream.grant_bind(pods, key_hash), "iat": now, "exp": now + 300,
                                       **claims})


def test_a_log_grant_opens_only_its_pods_with_its_key_while_fresh(plane: Path):
    key, kh = logstream.new_key()
    grant = log_grant(plane, [POD_A], kh)
    claims = logstream.check_log_grant(plane, grant, key, service="hms-ach", pod=POD_A)
    assert claims["sub"] == "vic"
    refusals = {
        "another pod": dict(grant=grant, key=key, service="hms-ach", pod=POD_B),
        "another service": dict(grant=grant, key=key, service="hms-frm", pod=POD_A),
        "another key": dict(grant=grant, key=logstream.new_key()[0], service="hms-ach", pod=POD_A),
        "too old": dict(grant=log_grant(plane, [POD_A], kh, iat=int(time.time()) - 120), key=key,
                        service="hms-ach", pod=POD_A),
        "another act": dict(grant=log_grant(plane, [POD_A], kh, act="status"), key=key, service="hms-ach",
                            pod=POD_A),
        "none": dict(grant="", key=key, service="hms-ach", pod=POD_A),
    }
    for why, kw in refusals.items():
        with pytest.raises(AccessDenied):
            logstream.check_log_grant(plane, kw.pop("grant"), kw.pop("key"), **kw)
            pytest.fail(why)


async def test_a_pod_that_cannot_be_read_ends_alone_or_ends_it_all():
    grant = LogGrantOutput(grant="g", endpoints=[LogEndpoint(pod=POD_A, node="n1", url="")])
    alone = logstream.PodStreams("k", service="hms-ach", tail=10, follow=True, each_alone=True)
    alone.add(grant)
    lines = [item async for item in alone.lines()]
    assert len(lines) == 1 and lines[0].end and lines[0].pod == POD_A
    assert "node n1 serves no log stream" in lines[0].text

    strict = logstream.PodStreams("k", service="hms-ach", tail=10, follow=True)
    strict.add(grant)
    with pytest.raises(HmsError, match="serves no log stream"):
        [item async for item in strict.lines()]


def test_a_line_without_newline_is_cut_at_max_line_and_nothing_more_waits():
    split = LineSplitter(max_line=4)
    assert split.feed(b"abc") == []
    assert split.feed(b"defghij") == ["abcd", "efgh"]  # "ij" waits for the rest
    assert split.feed(b"kl\nmnop\n") == ["ijkl", "mnop"]  # exactly max_line before a newline: one line
    assert split.feed(b"q" * 10) == ["qqqq", "qqqq"] and split.flush() == ["qq"]


def test_megabytes_without_newline_are_given_out_in_64k_pieces_in_linear_time():
    split = LineSplitter()
    chunk = b"A" * (64 * 1024)
    started = time.process_time()
    lengths = [len(line) for _ in range(256) for line in split.feed(chunk)]  # 16 MiB, fed as a follow reads
    assert time.process_time() - started < 5.0  # each byte copied a bounded number of times
    assert lengths == [64 * 1024] * 255 and split._size == 64 * 1024  # the last piece waits: a newline may follow
    assert split.feed(b"\n") == ["A" * (64 * 1024)]


def test_a_followed_file_without_newlines_yields_pieces_while_it_grows(tmp_path: Path):
    log = tmp_path / "pod.log"
    log.write_bytes(b"")
    follow = FileFollow(log, 10, lambda: True)
    seen: list[int] = []
    reader = threading.Thread(target=lambda: seen.extend(len(line) for line in follow), daemon=True)
    reader.start()
    with open(log, "ab") as w:
        w.write(b"B" * (1 << 20) + b"C")
    deadline = time.monotonic() + 10
    while len(seen) < 16 and time.monotonic() < deadline:
        time.sleep(0.05)
    follow.close()
    reader.join(timeout=5)
    assert seen[:16] == [64 * 1024] * 16


def test_the_tail_cuts_a_long_line_as_a_follow_does(tmp_path: Path):
    log = tmp_path / "pod.log"
    log.write_bytes(b"x" * (100 * 1024) + b"\nshort\n")
    assert [len(line) for line in read_tail(log, 0)[0]] == [64 * 1024, 36 * 1024, 5]
