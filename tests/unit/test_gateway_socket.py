"""The gateway's listening socket: connections get TCP_NODELAY."""

from __future__ import annotations

import socket

from ingest.gateway.server import _bind


def test_connections_of_the_gateway_socket_get_nodelay() -> None:
    # Regression: a socket made with proto 0 made asyncio skip TCP_NODELAY on its
    # connections, and Nagle + delayed ACK added 40 ms to every response.
    sock = _bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()
