"""Following a pod's log as it grows (``hms logs -f``): a blocking iterator of lines that ends
when the pod stops running, and that another thread may ``close()`` at any time.

Both drivers give one: a process pod's log file read as it grows (``FileFollow``), a
container's ``docker logs --follow`` stream split into lines (``StreamFollow``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

POLL_S = 0.025  # how often a quiet log file is read again (one read(2)): a new line shows within this
ALIVE_EVERY_S = 0.5  # how often a quiet follow asks whether its pod still runs
TAIL_WINDOW = 256 * 1024  # the tail is read from at most this many bytes before the end
MAX_LINE = 64 * 1024  # a longer line (a pod writing without newlines) is given out in pieces of this size
READ_CHUNK = 64 * 1024


class LineSplitter:
    """Bytes in, whole lines out; what is left of a line without its newline waits for the rest.
    A line ends at LF (a CR before it is dropped); a CR inside a line stays in it, for the log
    server to send escaped (:func:`hms_mgmt.logstream.one_line`).

    A line is at most ``max_line`` bytes: a pod that writes more without a newline has it cut
    into pieces of that size, each given out as a line, so what waits for a newline stays
    bounded. The waiting bytes are kept as pieces and joined once, never copied per ``feed``."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._parts: list[bytes] = []
        self._size = 0  # bytes in _parts, never above max_line

    def _take(self, last: bytes) -> bytes:
        parts, self._parts, self._size = self._parts, [], 0
        return b"".join([*parts, last]) if parts else last

    def feed(self, data: bytes) -> list[str]:
        out: list[str] = []
        start, n = 0, len(data)
        while start < n:
            room = self.max_line - self._size  # bytes this line may still take
            nl = data.find(b"\n", start, start + room + 1)
            if nl >= 0:
                out.append(self._take(data[start:nl]).rstrip(b"\r").decode(errors="replace"))
                start = nl + 1
            elif n - start > room:  # more than a line's worth and no newline: cut it there
                out.append(self._take(data[start:start + room]).decode(errors="replace"))
                start += room
            else:
                self._parts.append(data[start:])
                self._size += n - start
                break
        return out

    def flush(self) -> list[str]:
        rest = self._take(b"")
        return [rest.decode(errors="replace")] if rest else []


class LogFollow:
    """The pod's last ``tail`` lines, then each new one; ends once the pod no longer runs."""

    def __init__(self) -> None:
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Stop following (from any thread): iteration ends soon after."""
        self._closed.set()

    def __iter__(self) -> Iterator[str]:
        raise NotImplementedError


def read_tail(path: Path, tail: int) -> tuple[list[str], int]:
    """The last ``tail`` whole lines of ``path`` (all, for 0) and the offset they end at."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = max(0, size - TAIL_WINDOW)
        f.seek(start)
        data = f.read(size - start)
    end = data.rfind(b"\n") + 1  # a line still being written is followed, not tailed
    head = data.find(b"\n", 0, end) + 1 if start > 0 else 0  # the first is cut at the window's edge
    # Cut as LineSplitter cuts what follows: at LF only (a CR inside a line stays in it), and a
    # line longer than MAX_LINE in pieces.
    lines = LineSplitter().feed(data[head:end])
    return (lines[-tail:] if tail > 0 else lines), start + end


class FileFollow(LogFollow):
    """A log file read as it grows (``tail -f``), while ``running()`` says the pod runs; once it
    does not, what it wrote last is read and the follow ends."""

    def __init__(self, path: Path, tail: int, running: Callable[[], bool]) -> None:
        super().__init__()
        self.path = path
        self.running = running
        self.lines, self.offset = read_tail(path, tail)

    def __iter__(self) -> Iterator[str]:
        yield from self.lines
        split = LineSplitter()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            quiet = 0.0
            while not self.closed:
                data = f.read(READ_CHUNK)
                if data:
                    quiet = 0.0
                    yield from split.feed(data)
                    continue
                if quiet >= ALIVE_EVERY_S:
                    quiet = 0.0
                    if not self.running():
                        while data := f.read(READ_CHUNK):  # what it wrote last, a chunk at a time
                            yield from split.feed(data)
                        yield from split.flush()
                        return
                self._closed.wait(POLL_S)
                quiet += POLL_S


class StreamFollow(LogFollow):
    """A stream of byte chunks (``container.logs(stream=True, follow=True)``) split into lines;
    ``close()`` closes the stream, which ends a blocked read at once."""

    def __init__(self, stream: Iterable[bytes], closer: Callable[[], Any]) -> None:
        super().__init__()
        self.stream = stream
        self.closer = closer

    def close(self) -> None:
        super().close()
        try:
            self.closer()
        except Exception:  # noqa: BLE001 - the stream may already be gone
            pass

    def __iter__(self) -> Iterator[str]:
        split = LineSplitter()
        try:
            for chunk in self.stream:
                if self.closed:
                    return
                yield from split.feed(chunk)
        except Exception:  # noqa: BLE001 - a closed or broken stream ends the follow
            if not self.closed:
                raise
            return
        yield from split.flush()
