"""HTTP/1.1 on the wire (RFC 9112), as much as the transport needs: request heads encoded once,
and an incremental parser for the answers, fed bytes as they arrive.

The parser frames the body by `Transfer-Encoding: chunked` (trailers read and dropped), else
`Content-Length`, else the connection's end (HTTP/1.0 style); it skips 1xx interim answers and
says whether the connection may carry another request. It keeps a body only when the status is
not 2xx (the error detail), and at most `MAX_KEPT_BODY` bytes of it.
"""

from __future__ import annotations

from collections.abc import Iterable

# Limits against a server that never ends a line: a head, one chunk-size line, all trailers.
MAX_HEAD = 65_536
MAX_LINE = 4_096
# Enough for a 300-character detail once the key is redacted out of it.
MAX_KEPT_BODY = 8_192

# Parser states.
_HEAD, _LENGTH, _UNTIL_CLOSE, _CHUNK_SIZE, _CHUNK, _CHUNK_END, _TRAILERS, _DONE = range(8)


class MalformedAnswer(ValueError):
    """Bytes that are not an HTTP/1.x answer."""


def head(method: str, target: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """The request line and header lines, each ended by CRLF, without the blank line that ends
    a head. ValueError for a value a header cannot carry (CR, LF, NUL, not Latin-1)."""
    lines = [f"{method} {target} HTTP/1.1"]
    for name, value in headers:
        if any(ch in value for ch in "\r\n\0"):
            raise ValueError(f"header {name} cannot carry a line break or NUL")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n").encode("latin-1")


def _tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in value.split(",")} if value else set()


class ResponseParser:
    """One answer, fed in pieces of any size (`feed`, then `feed_eof` if the connection ends).

    Once complete: `status`, `reason`, `headers` (lower-case names; a repeated header's values
    joined with ", "), `body` (non-2xx only), `keep_alive` (another request may follow on the
    connection) and `rest` (bytes after the answer). `received` counts the bytes fed, so a
    caller can tell "no answer at all" from "an answer cut short". `head_only` ends the answer
    with its head (a CONNECT's: after a 2xx the tunnel begins; `rest` is the tunnel's).
    """

    def __init__(self, head_only: bool = False) -> None:
        self.head_only = head_only
        self.status = 0
        self.reason = ""
        self.headers: dict[str, str] = {}
        self.keep_alive = False
        self.rest = b""
        self.received = 0
        self._state = _HEAD
        self._buf = b""  # bytes fed and not yet taken
        self._scanned = 0  # how far the search for the head's end has looked
        self._left = 0  # bytes left in the body or the current chunk
        self._trailers = 0
        self._kept: list[bytes] | None = None  # the body's pieces, when kept
        self._kept_size = 0

    @property
    def complete(self) -> bool:
        return self._state == _DONE

    @property
    def body(self) -> bytes:
        return b"".join(self._kept or ())

    def feed(self, data: bytes) -> bool:
        """Take the next bytes of the connection; True once the answer is complete.
        Raises MalformedAnswer."""
        self.received += len(data)
        buf = self._buf + data if self._buf else data
        pos = 0
        while True:
            state = self._state
            if state == _HEAD:
                end = self._head_end(buf, pos)
                if end < 0:
                    if len(buf) - pos > MAX_HEAD:
                        raise MalformedAnswer(f"answer head longer than {MAX_HEAD} bytes")
                    break
                self._parse_head(buf[pos:end])
                pos = end
            elif state in (_LENGTH, _CHUNK):
                n = min(self._left, len(buf) - pos)
                self._keep(buf, pos, pos + n)
                pos += n
                self._left -= n
                if self._left:
                    break
                self._state = _DONE if state == _LENGTH else _CHUNK_END
            elif state == _UNTIL_CLOSE:
                self._keep(buf, pos, len(buf))
                pos = len(buf)
                break
            elif state == _CHUNK_END:
                if buf.startswith(b"\r\n", pos):
                    pos += 2
                elif buf.startswith(b"\n", pos):
                    pos += 1
                elif buf[pos:] in (b"", b"\r"):  # its line end still to come
                    break
                else:
                    raise MalformedAnswer("chunk not followed by CRLF")
                self._state = _CHUNK_SIZE
            elif state in (_CHUNK_SIZE, _TRAILERS):
                end = buf.find(b"\n", pos)
                if end < 0:
                    if len(buf) - pos > MAX_LINE:
                        raise MalformedAnswer("chunk-size or trailer line too long")
                    break
                line = buf[pos:end].rstrip(b"\r")
                pos = end + 1
                if state == _CHUNK_SIZE:
                    self._chunk_size(line)
                elif not line:
                    self._state = _DONE
                else:
                    self._trailers += len(line)
                    if self._trailers > MAX_HEAD:
                        raise MalformedAnswer("trailers too long")
            else:  # _DONE
                self.rest = buf[pos:]
                self._buf = b""
                return True
        self._buf = buf[pos:] if pos < len(buf) else b""
        return False

    def feed_eof(self) -> bool:
        """The connection ended: True if that completes the answer (a body read until close)."""
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
        return self._state == _DONE

    def _head_end(self, buf: bytes, pos: int) -> int:
        """Where the head that starts at `pos` ends (after its blank line), or -1 if it has not
        yet; what was searched is not searched again."""
        start = pos + self._scanned
        crlf, lf = buf.find(b"\n\r\n", start), buf.find(b"\n\n", start)
        if crlf < 0 and lf < 0:
            self._scanned = max(0, len(buf) - pos - 2)
            return -1
        self._scanned = 0
        if lf < 0 or 0 <= crlf < lf:
            return crlf + 3
        return lf + 2

    def _chunk_size(self, line: bytes) -> None:
        digits = line.split(b";", 1)[0].strip(b" \t")
        if not digits or len(digits) > 16 or digits.strip(b"0123456789abcdefABCDEF"):
            raise MalformedAnswer(f"bad chunk size {line[:40]!r}")
        self._left = int(digits, 16)
        self._state = _CHUNK if self._left else _TRAILERS

    def _keep(self, buf: bytes, start: int, end: int) -> None:
        if self._kept is not None and self._kept_size < MAX_KEPT_BODY:
            piece = buf[start:min(end, start + MAX_KEPT_BODY - self._kept_size)]
            self._kept.append(piece)
            self._kept_size += len(piece)

    def _parse_head(self, raw: bytes) -> None:
        lines = raw.decode("latin-1").replace("\r\n", "\n").split("\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit() \
                or not code.isascii():
            raise MalformedAnswer(f"bad status line {lines[0][:60]!r}")
        status = int(code)
        if status < 100:
            raise MalformedAnswer(f"bad status {status}")
        headers: dict[str, str] = {}
        name = ""
        for line in lines[1:]:
            if not line:
                continue
            if line[0] in " \t":  # obsolete line folding: part of the previous value
                if not name:
                    raise MalformedAnswer("continuation line before any header")
                headers[name] += " " + line.strip(" \t")
                continue
            key, colon, value = line.partition(":")
            if not colon or not key or key[0] in " \t" or key[-1] in " \t":
                raise MalformedAnswer(f"bad header line {line[:60]!r}")
            name = key.lower()
            value = value.strip(" \t")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if status < 200:  # 1xx: an interim answer; the real one follows
            return
        self.status, self.reason, self.headers = status, reason, headers
        self._frame(version == "HTTP/1.1")

    def _frame(self, http11: bool) -> None:
        """Choose how the body ends (RFC 9112 §6.3), and whether the connection stays open."""
        headers = self.headers
        connection = _tokens(headers.get("connection"))
        self.keep_alive = "close" not in connection if http11 else "keep-alive" in connection
        if not 200 <= self.status < 300:
            self._kept = []
        if self.head_only or self.status in (204, 304):
            self._state = _DONE
            return
        coding = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if coding is not None:
            if coding.rsplit(",", 1)[-1].strip().lower() == "chunked":
                self._state = _CHUNK_SIZE
                # Both framings at once is how requests get smuggled: not trusted further.
                self.keep_alive = self.keep_alive and length is None
            else:
                self._state, self.keep_alive = _UNTIL_CLOSE, False
        elif length is not None:
            values = {v.strip() for v in length.split(",")}
            value = values.pop()
            if values or not value.isdigit() or not value.isascii():
                raise MalformedAnswer(f"bad Content-Length {length[:40]!r}")
            self._left = int(value)
            self._state = _LENGTH if self._left else _DONE
        else:
            self._state, self.keep_alive = _UNTIL_CLOSE, False
