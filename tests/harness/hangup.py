"""Clients that hang up on a completion, and a plain one, over raw sockets: an HTTP/1.1 client that resets the
connection once the response headers are in, an h2c client that sends RST_STREAM CANCEL then, and one that reads
until the connection ends (when the upstream cuts its body); and a whole h2c request with a raw-bytes :path.
Standard library, plus `h2` for HTTP/2."""

from __future__ import annotations

import socket
import struct

from .util import scaled


def http1_hang_up_after_headers(port: int, path: str, organisation_id: str, method: str = "POST") -> bytes:
    """Sends the request on a raw HTTP/1.1 connection, reads until the response headers are in, then closes the
    connection with a reset (SO_LINGER 0). Returns the head of the response."""
    with socket.create_connection(("127.0.0.1", port), timeout=scaled(20)) as s:
        s.sendall(b"%s %s HTTP/1.1\r\nHost: jobs\r\nContent-Length: 2\r\nx-organisation-id: %s\r\n\r\n{}"
                  % (method.encode(), path.encode(), organisation_id.encode()))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, f"the connection closed before the response headers: {data!r}"
            data += chunk
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return data.partition(b"\r\n\r\n")[0]


def h2_cancel_after_headers(port: int, path: str, organisation_id: str) -> int:
    """POSTs over h2c (prior knowledge), and once the response headers are in sends RST_STREAM CANCEL for the
    stream. Returns the response status."""
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    with socket.create_connection(("127.0.0.1", port), timeout=scaled(20)) as s:
        conn.initiate_connection()
        s.sendall(conn.data_to_send())
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(b":method", b"POST"), (b":path", path.encode()), (b":scheme", b"http"),
                                (b":authority", b"jobs"), (b"x-organisation-id", organisation_id.encode())])
        conn.send_data(sid, b"{}", end_stream=True)
        s.sendall(conn.data_to_send())
        status = None
        while status is None:
            data = s.recv(65536)
            assert data, "the connection closed before the response headers"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                assert not isinstance(ev, h2.events.StreamReset), "Envoy reset the stream first"
            s.sendall(conn.data_to_send())
        conn.reset_stream(sid, error_code=h2.errors.ErrorCodes.CANCEL)
        s.sendall(conn.data_to_send())
        # Envoy acknowledges nothing for a reset; a GOAWAY from us ends the connection cleanly.
        conn.close_connection()
        s.sendall(conn.data_to_send())
    return status


def http1_read_cut_answer(port: int, path: str, organisation_id: str, method: str = "POST") -> bytes:
    """Sends the request and reads until Envoy closes the connection (the upstream cut its body); returns what
    came."""
    with socket.create_connection(("127.0.0.1", port), timeout=scaled(20)) as s:
        s.sendall(b"%s %s HTTP/1.1\r\nHost: jobs\r\nContent-Length: 2\r\nx-organisation-id: %s\r\n\r\n{}"
                  % (method.encode(), path.encode(), organisation_id.encode()))
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    return data


def h2_complete(port: int, path: bytes, organisation_id: str) -> int:
    """One whole h2c POST whose :path is raw bytes (HTTP/2 lets bytes that are not UTF-8 through); returns the
    status once the response has ended."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False))
    with socket.create_connection(("127.0.0.1", port), timeout=scaled(20)) as s:
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(b":method", b"POST"), (b":path", path), (b":scheme", b"http"),
                                (b":authority", b"jobs"), (b"x-organisation-id", organisation_id.encode())])
        conn.send_data(sid, b"{}", end_stream=True)
        s.sendall(conn.data_to_send())
        status, done = None, False
        while not done:
            data = s.recv(65536)
            assert data, "the connection closed before the response ended"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    done = True
            s.sendall(conn.data_to_send())
    return status
