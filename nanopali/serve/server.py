"""Running the app: listen on the socket first (so a taken port is one clear error), then serve with uvicorn
while the model loads on a thread; a model that fails to load stops the server with that error."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable

import uvicorn

from nanopali.errors import UsageError
from nanopali.serve.app import Settings, create_app


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port; the socket says which)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings, load: Callable[[], object], host: str, port: int, log_level: str = "info",
          load_siglip: Callable[[], object] | None = None) -> int:
    """Serve until interrupted; returns the exit status (2 when the model could not be loaded)."""
    sock = listen(host, port)
    failure: list[BaseException] = []
    server: uvicorn.Server | None = None

    def load_failed(error: BaseException) -> None:
        failure.append(error)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, load, on_load_error=load_failed, load_siglip=load_siglip)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"nanopali: serving {settings.model_name} on http://{shown}:{bound_port} (loading the model: /health "
          "answers 503 until it is ready)", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    if failure:
        raise failure[0]
    return 0
