"""Running the app under uvicorn with time limits on the connection itself.

uvicorn bounds an idle keep-alive connection (`timeout_keep_alive`) and the size of a header block
(`h11_max_incomplete_event_size`), but not how long a client may take to send its headers: a
client that sends half a request line and stalls holds its connection forever. `header_timeout`
closes such a connection (answering 408 when it had sent anything). The body has its own limit in
the app (`ServeConfig.body_timeout_s`), and the whole request its own (`request_timeout_s`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Optional

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

RESPONSE_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


@dataclass(frozen=True)
class ServerLimits:
    """Connection limits: seconds to send a request's headers, idle seconds between keep-alive
    requests, the largest header block in bytes, and the open connections at once (uvicorn's
    `limit_concurrency`: beyond it, new requests get 503)."""

    header_timeout_s: float = 10.0
    keep_alive_s: int = 5
    max_header_bytes: int = 16 * 1024
    max_connections: int = 1000


def header_timeout_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers are not in within
    `header_timeout_s` seconds of it opening (or of the previous answer, for keep-alive)."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: Optional[asyncio.TimerHandle] = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_timed_out(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.trailing_data[0]:  # part of a request came: say why it is closed
                self.transport.write(RESPONSE_408)
            self.transport.close()

    return HeaderTimeoutProtocol


def server_config(
    app: Any, host: str, port: int, limits: ServerLimits = ServerLimits(), **kwargs: Any
) -> uvicorn.Config:
    """A uvicorn config for `app` with `limits` (the h11 implementation, which they need)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=header_timeout_protocol(limits.header_timeout_s),
        timeout_keep_alive=limits.keep_alive_s,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        limit_concurrency=limits.max_connections,
        **kwargs,
    )
