"""The ceiling: ``asyncio.start_server`` answering 200 to every request, parsing nothing.

It only counts request lines (``HTTP/1.1\\r\\n``) in the byte stream so that
it answers each request once, and sends trt_bot's webhook answer
(``{"ok":true}``).  No headers, no JSON, no storage: what is left is the cost
of asyncio streams and the kernel's loopback, on the same event loop trt_bot
uses (uvloop unless BENCH_UVLOOP=0).  ``GET /health`` is just another request.
"""

from __future__ import annotations

import asyncio
import os
import socket

MARKER = b"HTTP/1.1\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n" + b'{"ok":true}'


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pending = b""
    try:
        while data := await reader.read(65536):
            pending += data
            count = pending.count(MARKER)
            if count:
                pending = pending[pending.rfind(MARKER) + len(MARKER):]
                writer.write(RESPONSE * count)
            else:
                pending = pending[-(len(MARKER) - 1):]
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve() -> None:
    server = await asyncio.start_server(answer, os.environ.get("HOST", "127.0.0.1"), int(os.environ["PORT"]),
                                        backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    factory = None
    if os.environ.get("BENCH_UVLOOP", "1") != "0":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve())


if __name__ == "__main__":
    main()
