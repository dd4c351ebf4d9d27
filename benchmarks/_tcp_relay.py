"""A bare TCP relay: the floor of what forwarding a token stream through one more process costs.

    python benchmarks/_tcp_relay.py LISTEN_PORT TARGET_PORT

Each accepted connection is piped to 127.0.0.1:TARGET_PORT by two threads doing blocking
recv/sendall, nothing else: one wake-up and one send per chunk, no parsing, no encryption,
no event loop. A node relaying a peer's stream does at least this much per token; the
benchmark runs local requests through it to show what any per-token relay costs on this box.
"""

from __future__ import annotations

import socket
import sys
import threading


def pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main() -> None:
    listen_port, target_port = int(sys.argv[1]), int(sys.argv[2])
    server = socket.create_server(("127.0.0.1", listen_port))
    print("ready", flush=True)
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection(("127.0.0.1", target_port))
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()


if __name__ == "__main__":
    main()
