"""The gateway fault matrix: each fault, how to provoke it, and what every edge must say.

Shared by the reliability tests (which assert it) and `bench/faults.py` (which measures
it), so the published table and the tests describe the same faults.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ibkr_sync import exceptions
from ibkr_sync.testing import GatewaySimulator


@dataclass(frozen=True)
class GatewayFault:
    name: str
    phase: str
    error: type[exceptions.IbkrSyncError]
    http_status: int
    exit_code: int
    # Simulator fault settings (see `ibkr_sync.testing.Faults`).
    faults: dict[str, Any] = field(default_factory=dict)
    # Where the app connects: the simulator, a closed port, a port that never answers, or
    # one where something other than a gateway answers (`NOT_A_GATEWAY`).
    target: str = "simulator"
    # The configured timeout that bounds the wait; None: it fails at once.
    waits_for: str | None = None

    @property
    def code(self) -> str:
        return self.error.code


U, T, C, E, N, G = (
    exceptions.GatewayUnavailable,
    exceptions.GatewayTimeout,
    exceptions.ClientIdInUse,
    exceptions.IncompleteSnapshot,
    exceptions.NoManagedAccounts,
    exceptions.NotAGateway,
)

GATEWAY_FAULTS = [
    GatewayFault("refused", "connect", U, 503, 3, target="closed_port"),
    # A gateway closes before answering the handshake when it refuses this client (a proxy
    # with no gateway behind it does too): unavailable, the message says both.
    GatewayFault("reset on connect", "connect", U, 503, 3, {"refuse_connections": True}),
    GatewayFault("no answer on connect", "connect", T, 504, 4, target="silent_port",
                 waits_for="connect"),
    GatewayFault("dropped in handshake", "handshake", U, 503, 3, {"drop_during_handshake": True}),
    GatewayFault("closed at once", "handshake", U, 503, 3, target="closes_at_once"),
    GatewayFault("a web server", "handshake", G, 503, 3, target="http"),
    GatewayFault("junk in answer", "handshake", G, 503, 3, target="junk"),
    GatewayFault("326 client id in use", "handshake", C, 502, 7,
                 {"error_on_connect": (326, "")}),
    GatewayFault("502 cannot connect", "handshake", U, 503, 3, {"error_on_connect": (502, "")}),
    GatewayFault("1100 link to IBKR lost", "handshake", U, 503, 3,
                 {"error_on_connect": (1100, "")}),
    GatewayFault("2110 link to IBKR broken", "handshake", U, 503, 3,
                 {"error_on_connect": (2110, "")}),
    GatewayFault("dropped in positions", "positions", U, 503, 3, {"drop_after_positions": 2}),
    GatewayFault("hang in positions", "positions", T, 504, 4, {"hang_positions": True},
                 waits_for="request"),
    GatewayFault("no managed accounts", "handshake", N, 502, 8, {"no_managed_accounts": True}),
    GatewayFault("malformed frame", "positions", E, 502, 8, {"malformed_position": True}),
    GatewayFault("unset quantity (empty)", "positions", E, 502, 8,
                 {"position_edits": {"quantity": ""}}),
    GatewayFault("unset quantity (UNSET_INTEGER)", "positions", E, 502, 8,
                 {"position_edits": {"quantity": "2147483647"}}),
    GatewayFault("quantity outside the wire grammar", "positions", E, 502, 8,
                 {"position_edits": {"quantity": "1_000"}}),
    GatewayFault("unreadable average cost", "positions", E, 502, 8,
                 {"position_edits": {"average_cost": "abc"}}),
    GatewayFault("unset contract id", "positions", E, 502, 8,
                 {"position_edits": {"con_id": ""}}),
    GatewayFault("undecodable message id", "positions", E, 502, 8,
                 {"position_edits": {"msg_id": "6l"}}),
    GatewayFault("frame the library cannot decode", "positions", E, 502, 8,
                 {"extra_frames": [["9", "1"]]}),
    GatewayFault("1100 in a layout the library rejects", "positions", U, 503, 3,
                 {"extra_frames": [["4", "2", "-1", "1100", "Connectivity lost"]]}),
    GatewayFault("504 not connected", "positions", U, 503, 3,
                 {"error_on_positions": (504, "")}),
    GatewayFault("1100 in positions", "positions", U, 503, 3,
                 {"error_on_positions": (1100, "")}),
    GatewayFault("2110 in positions", "positions", U, 503, 3,
                 {"error_on_positions": (2110, "")}),
]  # fmt: skip


def free_port() -> int:
    """A loopback port nothing listens on (connecting to it is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A loopback port that accepts TCP connections and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


class _Peer(socketserver.BaseRequestHandler):
    """One connection to a port where something other than a gateway listens."""

    def handle(self) -> None:
        answer = self.server.answer  # type: ignore[attr-defined]
        with contextlib.suppress(OSError):
            answer(self.request)


def _reply(data: bytes):
    def answer(sock: socket.socket) -> None:
        sock.recv(4096)  # the client's API handshake
        sock.sendall(data)
        sock.recv(4096)  # until the client goes

    return answer


def _http(sock: socket.socket) -> None:
    """As nginx or Node's HTTP server answer a request line holding a byte no HTTP method
    may (the handshake's NUL): 400 at once, and close; a real request gets a page."""
    request = sock.recv(4096)
    method = request.split(b" ", 1)[0]
    if method.isalpha() and method.isupper() and b" HTTP/1." in request:
        body = b"<html><body>hello</body></html>"
        status = b"200 OK"
    else:
        body = b"<html><head><title>400 Bad Request</title></head></html>\r\n"
        status = b"400 Bad Request"
    sock.sendall(
        b"HTTP/1.1 " + status + b"\r\nServer: nginx\r\nContent-Type: text/html\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    )


def _closes_at_once(sock: socket.socket) -> None:
    sock.close()


def _ssh(sock: socket.socket) -> None:
    """A server that speaks first (SSH, SMTP, ...): its banner, before any request."""
    sock.sendall(b"SSH-2.0-OpenSSH_9.6p1 Debian-4\r\n")
    sock.recv(4096)


#: Peers that are not a gateway, by target name: what each does with a connection.
NOT_A_GATEWAY = {
    "http": _http,
    "junk": _reply(bytes.fromhex("deadbeef") + bytes(range(40))),
    "short frame": _reply(struct.pack(">I", 6) + b"hello\0"),
    "ssh": _ssh,
    "closes_at_once": _closes_at_once,
}


@contextlib.contextmanager
def not_a_gateway(kind: str) -> Iterator[int]:
    """A loopback port where `kind` (of `NOT_A_GATEWAY`) answers every connection."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Peer)
    server.daemon_threads = True
    server.answer = NOT_A_GATEWAY[kind]  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def provoke(fault: GatewayFault, simulator: GatewaySimulator) -> Iterator[int]:
    """Arrange `fault`; yields the port the app must connect to. Cleared on exit."""
    if fault.target == "closed_port":
        yield free_port()
    elif fault.target == "silent_port":
        with silent_listener() as port:
            yield port
    elif fault.target in NOT_A_GATEWAY:
        with not_a_gateway(fault.target) as port:
            yield port
    else:
        simulator.set_faults(**fault.faults)
        try:
            yield simulator.port
        finally:
            simulator.clear_faults()
