#!/usr/bin/env python3
"""TCP 127.0.0.1 -> unix socket bridge for scripts/api-fuzz.sh.

Usage: bridge.py UNIX_SOCKET PORT_FILE

Listens on 127.0.0.1 on a free port (written to PORT_FILE once listening)
and forwards every TCP connection to UNIX_SOCKET. While the VM behind the
socket is being restarted (after a shutdown request) the socket is missing
for a moment: a connection waits up to CONNECT_WAIT seconds for it rather
than failing. Every connection is bounded by IDLE seconds of silence.
"""

import os
import socket
import sys
import threading
import time

CONNECT_WAIT = 15.0
IDLE = 60.0


def connect_unix(path):
    deadline = time.monotonic() + CONNECT_WAIT
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def handle(client, path):
    client.settimeout(IDLE)
    try:
        upstream = connect_unix(path)
    except OSError as e:
        sys.stderr.write(f"bridge: cannot reach {path}: {e}\n")
        client.close()
        return
    upstream.settimeout(IDLE)
    t = threading.Thread(target=pump, args=(client, upstream), daemon=True)
    t.start()
    pump(upstream, client)
    t.join(IDLE)
    client.close()
    upstream.close()


def main():
    path, port_file = sys.argv[1], sys.argv[2]
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(srv.getsockname()[1]))
    os.rename(tmp, port_file)
    while True:
        client, _ = srv.accept()
        threading.Thread(target=handle, args=(client, path), daemon=True).start()


if __name__ == "__main__":
    main()
