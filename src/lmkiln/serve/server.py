"""`kiln serve`: the options checked and the port bound before the model loads (a busy port is one line
at once, not after a minute of loading), then the app (serve/app.py) under uvicorn."""

from __future__ import annotations

import socket
from pathlib import Path

from lmkiln.errors import UserError
from lmkiln.log import console
from lmkiln.model.inference.load import check_model_dir


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: expected 0 to 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UserError(
            f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); stop what holds it or choose another port"
        ) from None
    return sock


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """`NAME=DIR` options as {name: adapter directory}, each checked."""
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or "+" in name:
            raise UserError(f"--adapter '{spec}': expected NAME=DIR (a name without '+')")
        if not (Path(path) / "adapter_config.json").is_file():
            raise UserError(f"--adapter {name}: '{path}' has no adapter_config.json")
        adapters[name] = Path(path)
    return adapters


def serve(
    model: Path | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str | None = None,
    device: str = "auto",
    adapters: list[str] | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    context: int | None = None,
    api_key: str | None = None,
    cors: list[str] | None = None,
    max_request_bytes: int = 1 << 20,
    log_requests: Path | None = None,
    log_redact: bool = True,
    log_max_mb: int = 64,
    log_max_files: int = 20,
    models_file: Path | None = None,
    version: str | None = None,
    blocklist: Path | None = None,
    max_concurrent: int = 128,
    prefix_cache_mb: int = 64,
) -> None:
    """Serve `model` until interrupted (with `log_requests`, each generation logged there). With
    `models_file` instead, serve the version it names, and on SIGHUP load the one it names then."""
    if (model is None) == (models_file is None):
        raise UserError("kiln serve: name a model directory or --models-file FILE (one of them)")
    if models_file is not None:
        from lmkiln.serve.admin import read_models_file

        spec = read_models_file(models_file)
        if adapters or version:
            raise UserError("--models-file: its adapters and version are in the file; drop --adapter and --version")
        model, version = Path(spec.model), spec.version
        adapters = [f"{n}={d}" for n, d in spec.adapters.items()]
    check_model_dir(model)
    try:
        import uvicorn
    except ImportError:
        raise UserError("serving needs the 'serve' extra: pip install 'lmkiln[serve]'") from None
    from lmkiln.serve.app import create_app

    sizes = {
        "max-batch": max_batch,
        "max-queue": max_queue,
        "context": context,
        "max-request-bytes": max_request_bytes,
        "max-concurrent": max_concurrent,
        "log-max-mb": log_max_mb,
        "log-max-files": log_max_files,
    }
    for flag, value in sizes.items():
        if value is not None and value < 1:
            raise UserError(f"--{flag} {value}: expected a positive number")
    if prefix_cache_mb < 0:
        raise UserError(f"--prefix-cache-mb {prefix_cache_mb}: expected 0 (off) or more")
    found = parse_adapters(adapters or [])
    request_log = _request_log(log_requests, log_redact, log_max_mb, log_max_files)  # checked before binding
    from lmkiln.serve.blocklist import Blocklist

    blocked = Blocklist.read(blocklist) if blocklist is not None else None
    sock = bind(host, port)
    host, port = sock.getsockname()[:2]
    from lmkiln.serve.encoding import is_encoder

    page = "embeddings and classification" if is_encoder(model) else f"chat page at http://{host}:{port}/"
    console.print(f"kiln serve: {model} at http://{host}:{port}/v1 ({page})", soft_wrap=True)
    app = create_app(
        model,
        device,
        name,
        found,
        max_batch,
        max_queue,
        context,
        api_key,
        cors or [],
        max_request_bytes,
        background=True,
        request_log=request_log,
        version=version,
        blocklist=blocked,
        max_concurrent=max_concurrent,
        prefix_cache_mb=prefix_cache_mb,
    )
    if models_file is not None:
        from lmkiln.serve.admin import reload_on_sighup

        reload_on_sighup(app.state.server, models_file)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])


def _request_log(directory: Path | None, redact: bool, max_mb: int, max_files: int):
    """The request log `--log-requests` asks for: a directory of lmkiln's logs, never a file."""
    if directory is None:
        return None
    from lmkiln.serve.request_log import RequestLog

    if Path(directory).exists() and not Path(directory).is_dir():
        raise UserError(f"--log-requests {directory}: a file, not a directory")
    return RequestLog(Path(directory), redact, max_mb << 20, max_files)
