"""`animeddim serve`: a local web app to generate, interpolate, invert and watch runs.

Needs the optional extra (`pip install 'animeddim[web]'`: starlette, uvicorn,
python-multipart); the rest of animeddim works without it.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

WEB_EXTRA_HINT = "the web app needs its extra: pip install 'animeddim[web]'"


def missing_extra() -> str | None:
    """None when the web extra is installed, else the name of a missing package."""
    import importlib.util

    for name in ("starlette", "uvicorn", "multipart"):
        if importlib.util.find_spec(name) is None:
            return {"multipart": "python-multipart"}.get(name, name)
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one); OSError when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def serve(
    models: list[str],
    runs: str | None,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str = "auto",
    precision: str = "auto",
    log=print,
    allowed_hosts: tuple[str, ...] = (),
) -> None:
    """Load and warm the first model, bind, print the address, serve until Ctrl-C.
    `allowed_hosts`: names answered besides the local ones (a reverse proxy's)."""
    import uvicorn

    from .checks import Catalog
    from .handlers import Engine
    from .server import create_app

    catalog = Catalog(models, Path(runs) if runs else None)
    engine = Engine(catalog, device, precision)
    if not _is_loopback(host):
        print(
            f"warning: serving on {host}: anyone who can reach this machine on port {port} "
            "can use the app (there is no login)",
            file=sys.stderr,
        )
    sock = bind(host, port)  # first: a taken port fails before the model is loaded
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}/"
    first = next((c for c in catalog.choices() if c.can_sample), None)
    if first is not None:
        seconds = engine.warm_up(first)
        log(
            f"model {first.id} loaded and warmed up in {seconds:.1f}s "
            f"({engine.base.device}, {engine.base.precision})",
            flush=True,
        )
    app = create_app(engine, runs, local_names_only=_is_loopback(host), allowed_hosts=allowed_hosts)
    # Open job streams end within HEARTBEAT_S of a stop; 5 s leave a loaded machine room before
    # uvicorn cancels what is left (with a traceback), and cost nothing when nothing is open.
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    # Ctrl-C, SIGTERM: the open job streams end within 0.5 s, before uvicorn cancels them
    app.state.stopping = lambda: server.should_exit
    log(f"animeddim serve: ready at {url} (Ctrl-C to stop)", flush=True)
    server.run(sockets=[sock])
