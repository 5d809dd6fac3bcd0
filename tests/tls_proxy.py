"""A TLS front for a plain Redis, on loopback, for tests of ``rediss://``.

The embedded redis-server is built without TLS, so the tests put this proxy
in front of it: it ends TLS with a self-signed certificate (made with the
``openssl`` command, as Heroku Redis's is self-signed too) and passes the
bytes on to Redis. A connection Redis closes is closed toward the client.
"""

from __future__ import annotations

import select
import socket
import ssl
import subprocess
import threading
from pathlib import Path


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key: (cert, key)."""
    cert, key = folder / "redis-cert.pem", folder / "redis-key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


class TlsProxy:
    """Accepts TLS on a free loopback port and relays to ``upstream_port``."""

    def __init__(self, upstream_port: int, cert: Path, key: Path):
        self.upstream_port = upstream_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def start(self) -> TlsProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self.listener.close()
        with self._lock:
            for sock in list(self._open):
                _close(sock)
            self._open.clear()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(5)
        try:
            secure = self.context.wrap_socket(client, server_side=True)
        except (OSError, ssl.SSLError):
            # The client refused the certificate: that is what some tests want.
            _close(client)
            return
        secure.settimeout(None)
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        with self._lock:
            self._open.update((secure, upstream))
        peers = {secure: upstream, upstream: secure}
        try:
            while not self._stopped.is_set():
                # Bytes OpenSSL already decrypted are not seen by select.
                ready = [secure] if secure.pending() else []
                if not ready:
                    ready, _, _ = select.select(list(peers), [], [], 0.5)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except (OSError, ssl.SSLError, ValueError):
            return
        finally:
            with self._lock:
                self._open.difference_update((secure, upstream))
            _close(secure)
            _close(upstream)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
