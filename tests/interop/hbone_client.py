#!/usr/bin/python3
"""A third-party HBONE client for nodemesh's interop test (tests/tests/interop.rs).

Speaks HBONE with nothing of ours: Python's `ssl` (OpenSSL) for TLS 1.3 with ALPN h2 and a client
certificate, the `h2` package (Debian: python3-h2) for HTTP/2. Dials the server by IP, so no SNI
is sent. Makes one connection and at most one CONNECT stream, then prints one JSON object on
stdout:

- the handshake: negotiated "tls" version, "alpn", the server certificate's "peer_uris" (URI
  SANs; the chain was verified against --ca, host names are not checked);
- "refused": why, when the server ended the connection before answering (TLS alert or EOF
  before its HTTP/2 SETTINGS): what a refused client certificate looks like in TLS 1.3, where
  the client finishes its handshake before the server has checked its certificate;
- with --authority: the CONNECT response "status", whether the server ended the stream
  ("server_end_stream"), the RST_STREAM code if it also reset it ("reset"), and for 200 the
  bytes it sent back ("echo_hex", after the client sent --payload-hex with END_STREAM).

Exits non-zero only when the client itself cannot run (bad arguments, timeout).
"""

import argparse
import json
import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True, help="ip:port of the HBONE listener")
    p.add_argument("--ca", required=True, help="PEM roots to verify the server with")
    p.add_argument("--cert", help="client certificate (PEM)")
    p.add_argument("--key", help="client key (PEM)")
    p.add_argument("--authority", help="CONNECT :authority (ip:port); none: handshake only")
    p.add_argument("--payload-hex", default="", help="bytes to send on the stream, in hex")
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()

    host, port = args.server.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SPIFFE: the identity is a URI SAN, checked by the caller
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=args.ca)
    ctx.set_alpn_protocols(["h2"])
    if args.cert:
        ctx.load_cert_chain(args.cert, args.key)

    out = {}
    raw = socket.create_connection((host, int(port)), timeout=args.timeout)
    try:
        tls = ctx.wrap_socket(raw, server_hostname=None)
    except (ssl.SSLError, ConnectionError) as e:
        out["refused"] = f"handshake: {e}"
        print(json.dumps(out))
        return
    out["tls"] = tls.version()
    out["alpn"] = tls.selected_alpn_protocol()
    cert = tls.getpeercert()
    out["peer_uris"] = [v for (k, v) in cert.get("subjectAltName", ()) if k == "URI"]

    # h2 4.1 (Debian 12) insists on :path for every request, CONNECT included (RFC 9113 8.5
    # forbids it there): outbound validation is off, inbound validation stays on.
    config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())

    def events():
        """The server's next events; raises EOFError when it closed the connection."""
        data = tls.recv(65536)
        if not data:
            raise EOFError("connection closed by the server")
        evs = conn.receive_data(data)
        pending = conn.data_to_send()
        if pending:
            tls.sendall(pending)
        return evs

    # The server's SETTINGS: proof that it accepted the client (its certificate included).
    try:
        settings = False
        while not settings:
            settings = any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events())
    except (ssl.SSLError, EOFError, ConnectionError) as e:
        out["refused"] = f"after the handshake: {e}"
        print(json.dumps(out))
        return
    if not args.authority:
        print(json.dumps(out))
        return

    sid = conn.get_next_available_stream_id()
    # RFC 9113 8.5: a CONNECT carries :method and :authority only.
    conn.send_headers(sid, [(":method", "CONNECT"), (":authority", args.authority)])
    tls.sendall(conn.data_to_send())
    payload = bytes.fromhex(args.payload_hex)
    echo = bytearray()
    out["server_end_stream"] = False
    sending = False
    ended = False
    while not ended:
        for e in events():
            if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid:
                out["status"] = int(dict(e.headers)[b":status"])
                sending = out["status"] == 200
            elif isinstance(e, h2.events.DataReceived) and e.stream_id == sid:
                echo += e.data
                conn.acknowledge_received_data(e.flow_controlled_length, sid)
            elif isinstance(e, h2.events.StreamEnded) and e.stream_id == sid:
                out["server_end_stream"] = True
                ended = True
            elif isinstance(e, h2.events.StreamReset) and e.stream_id == sid:
                # After a complete response (END_STREAM) a server may reset a stream whose
                # request is still open, with NO_ERROR (RFC 9113 8.1): recorded, not a failure.
                out["reset"] = int(e.error_code)
                ended = True
            elif isinstance(e, h2.events.ConnectionTerminated):
                out["goaway"] = int(e.error_code)
                ended = True
        # The payload in frames the server's windows and frame size allow, the last one with
        # END_STREAM; the rest once the server opens its window again.
        while sending and not ended:
            n = min(
                len(payload),
                conn.local_flow_control_window(sid),
                conn.max_outbound_frame_size,
            )
            if n == 0 and payload:
                break
            chunk, payload = payload[:n], payload[n:]
            conn.send_data(sid, chunk, end_stream=not payload)
            sending = bool(payload)
        tls.sendall(conn.data_to_send())
    out["echo_hex"] = echo.hex()
    conn.close_connection()
    tls.sendall(conn.data_to_send())
    tls.close()
    print(json.dumps(out))


if __name__ == "__main__":
    try:
        main()
    except socket.timeout:
        sys.exit("hbone_client: timed out waiting for the server")
