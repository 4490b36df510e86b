"""One listening socket per web worker, so that the kernel spreads connections over the workers.

With ``serve --workers N``, uvicorn binds one socket in the parent and every worker accepts from
it. Whichever worker wakes first takes every connection waiting, so the persistent connections
of a line system (and of the load generator) often all land on one worker while the others idle:
on two cores, one worker then does the work of two. On Linux each worker here binds a socket of
its own to the same address with ``SO_REUSEPORT``, and the kernel hands each new connection to
one of them by a hash of its addresses: an even share on average, whatever the timing.

The socket is made in the worker: uvicorn's supervisor passes the parent's list of sockets to
every worker it starts (a replacement for a dead one too) by pickling it, and a ``ReusePortSocket``
arrives in the worker as a new socket bound there. A worker's socket listens only once its models
are loaded, so no connection waits on a worker that is still starting.
"""

from __future__ import annotations

import inspect
import socket
import sys
from collections.abc import Callable

# uvicorn's exit code for a worker that cannot start: its supervisor then stops instead of
# starting the worker again and again.
STARTUP_FAILURE = 3


def supported(port: int) -> bool:
    """Whether workers can have sockets of their own here: Linux (where the kernel balances such
    sockets; elsewhere it may give one of them every connection) and a fixed port."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT") and port != 0


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_free(host: str, port: int) -> None:
    """Raise OSError when the address is taken. Bound without SO_REUSEPORT, so that another
    service on the port, or this service started twice, is refused at once rather than joined."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def bind_reuse_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` beside the other workers' (uvicorn makes it listen)."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        print(f"cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        raise SystemExit(STARTUP_FAILURE) from None
    return sock


class ReusePortSocket:
    """Stands for a worker's socket in the parent; unpickled in a worker, it is one."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def __reduce__(self) -> tuple[Callable[[str, int], socket.socket], tuple[str, int]]:
        return bind_reuse_port, (self.host, self.port)


def run_workers(config, workers: int) -> None:  # noqa: ANN001 - a uvicorn.Config
    """Run ``workers`` uvicorn workers under uvicorn's own supervisor (restarts, signals), each
    on a socket of its own."""
    from uvicorn import Server
    from uvicorn.supervisors import Multiprocess

    sockets = [ReusePortSocket(config.host, config.port)]
    # Older uvicorn releases also take the function each worker runs.
    if "target" in inspect.signature(Multiprocess).parameters:
        supervisor = Multiprocess(config, target=Server(config=config).run, sockets=sockets)
    else:
        supervisor = Multiprocess(config, sockets=sockets)
    supervisor.run()
