"""A tiny keep-alive HTTP/1.1 client on asyncio streams for the load generator and benchmarks: far
less client CPU per request than a general-purpose client, so that on a shared 2-core machine the
figures measure the server, not the client."""

from __future__ import annotations

import asyncio
import time


class StaleConnection(ConnectionResetError):
    """The server closed a kept-alive connection before answering (nothing of the response was read)."""


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> "Conn":
        r, w = await asyncio.open_connection(host, port)
        return cls(r, w)

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """Send one POST and read its response (Content-Length framed, as the server answers)."""
        head = [f"POST {path} HTTP/1.1", "Host: bench", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise StaleConnection("server closed the connection")
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            k, _, v = line.decode().partition(":")
            if k.lower() == "content-length":
                length = int(v)
        data = await self.reader.readexactly(length)
        return status, data

    def close(self) -> None:
        self.writer.close()


async def closed_loop(host: str, port: int, path: str, body: bytes, headers: dict[str, str],
                      concurrency: int, duration_s: float, max_requests: int) -> tuple[list[float], int]:
    """`concurrency` clients each send back-to-back requests; returns per-request latencies (ms), errors."""
    lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration_s

    async def client() -> None:
        nonlocal errors
        c = await Conn.open(host, port)
        try:
            while time.perf_counter() < stop_at and len(lat) < max_requests:
                t0 = time.perf_counter()
                status, _ = await c.post(path, body, headers)
                if status == 200:
                    lat.append((time.perf_counter() - t0) * 1000)
                else:
                    errors += 1
        finally:
            c.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return lat, errors


class Pool:
    """Keep-alive connections, opened on demand up to `max_connections`; one request per connection."""

    def __init__(self, host: str, port: int, max_connections: int) -> None:
        self.host, self.port = host, port
        self._idle: list[Conn] = []
        self._slots = asyncio.Semaphore(max_connections)

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        async with self._slots:
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await Conn.open(self.host, self.port)
            try:
                result = await conn.post(path, body, headers)
            except StaleConnection:
                conn.close()
                if not reused:
                    raise
                conn = await Conn.open(self.host, self.port)  # an idle keep-alive timed out: once more, fresh
                result = await conn.post(path, body, headers)
            except BaseException:
                conn.close()
                raise
            self._idle.append(conn)
            return result

    def close(self) -> None:
        for c in self._idle:
            c.close()
        self._idle.clear()
