"""The soak's pod: answers every HTTP request with 200 "ok", nothing else; stdlib only, one thread.

Run by the process runtime as ``python3 -S -c <this file>`` (a catalog entry the soak writes),
so 1,000 of them fit in memory: ~7 MB each (PSS) against ~13 MB for the example service."""

import os
import selectors
import socket

server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((os.environ.get("HOST", "127.0.0.1"), int(os.environ["PORT"])))
server.listen(128)
server.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(server, selectors.EVENT_READ)
pending: dict = {}
while True:
    for key, _ in sel.select():
        conn = key.fileobj
        if conn is server:
            try:
                client, _ = server.accept()
            except OSError:
                continue
            client.setblocking(False)
            pending[client] = b""
            sel.register(client, selectors.EVENT_READ)
            continue
        try:
            data = conn.recv(4096)
        except OSError:
            data = b""
        pending[conn] += data
        if data and b"\r\n\r\n" not in pending[conn] and len(pending[conn]) < 65536:
            continue
        if data:
            try:
                conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
            except OSError:
                pass
        sel.unregister(conn)
        del pending[conn]
        conn.close()
