"""The admin API of `kiln serve` (behind its API key): GET /admin/models (the loaded versions and the
swaps so far), POST /admin/models (load a new version: a model directory and its adapters), POST
/admin/models/rollback (back to the version before); and SIGHUP, which re-reads `--models-file` and
loads what it names. A version that fails its load checks is refused and the running one keeps serving."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from lmkiln.errors import UserError
from lmkiln.log import console
from lmkiln.serve.protocol import ApiError

VERSION_HEADER = "X-Lmkiln-Version"  # on every reply: the version that answered


class VersionSpec(BaseModel):
    """A version to load: POST /admin/models's body, and what a --models-file holds (YAML or JSON)."""

    model_config = ConfigDict(extra="forbid")
    model: str  # a model directory on the server's disk
    adapters: dict[str, str] = {}  # name -> a LoRA adapter directory
    version: str | None = None  # the label; v1, v2, ... by default


def read_models_file(path: Path) -> VersionSpec:
    """A --models-file's version; relative paths are read from the file's folder."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"--models-file {path}: cannot read it ({exc})") from None
    try:
        spec = VersionSpec.model_validate(raw)
    except ValidationError as exc:
        err = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]  # a misspelt key first
        where = ".".join(str(p) for p in err["loc"]) or "the file"
        problem = f"unknown key '{where}'" if err["type"] == "extra_forbidden" else f"{where}: {err['msg']}"
        raise UserError(f"--models-file {path}: {problem} (expected model: DIR, adapters, version)") from None
    base = Path(path).parent
    return spec.model_copy(
        update={
            "model": str(base / spec.model),
            "adapters": {n: str(base / d) for n, d in spec.adapters.items()},
        }
    )


async def swap(server, spec: VersionSpec) -> dict:
    """Load `spec` beside the running version, check it, and send new requests to it."""
    versions, running = server.versions, server.active  # 503 while the first version loads
    if not versions.busy.acquire(blocking=False):
        raise ApiError(409, "a version is loading already; retry when it is done")
    adapters = {n: Path(d) for n, d in spec.adapters.items()}
    try:
        version = await asyncio.to_thread(versions.build, Path(spec.model), adapters, spec.version)
    except Exception as exc:  # a load that fails in any way is refused, never half-served
        server.metrics.swapped(False)
        reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        raise ApiError(422, f"version refused ({reason}); {running.label} keeps serving") from None
    finally:
        versions.busy.release()
    versions.activate(version)  # on the event loop: see Versions.activate (busy kept `running` active)
    server.metrics.swapped(True)
    console.print(f"kiln serve: version {version.label} ({version.model_dir}) now serves; {running.label} drains")
    return {"version": version.label, "model": versions.served_id(version), "previous": running.label}


def add_admin_routes(app, server) -> None:
    @app.get("/admin/models")
    def versions():
        found = server.versions
        return {
            "name": server.name,
            "active": found.active.label if found.active else None,
            "versions": found.describe(),
            "history": found.history,
        }

    @app.post("/admin/models")
    async def load(spec: VersionSpec):
        return await swap(server, spec)

    @app.post("/admin/models/rollback")
    def rollback():
        if server.versions.busy.locked():
            raise ApiError(409, "a version is loading; roll back when it is done")
        back = server.versions.rollback()
        console.print(f"kiln serve: rolled back to version {back.label} ({back.model_dir})")
        return {"version": back.label, "model": server.versions.served_id(back)}


def reload_on_sighup(server, models_file: Path) -> None:
    """From now on, SIGHUP loads the version `models_file` names. Call it on the main thread, the one
    that runs the server's event loop: a Python signal handler runs there, inside the loop."""

    def on_hup(signum, frame) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # the server is not running yet (or any more)
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(_reload(server, models_file)))

    signal.signal(signal.SIGHUP, on_hup)


async def _reload(server, models_file: Path) -> None:
    """SIGHUP: load the version --models-file names now; a refusal is one line, and serving goes on."""
    try:
        spec = read_models_file(models_file)
        await swap(server, spec)
    except (UserError, ApiError) as exc:
        console.print(f"kiln serve: SIGHUP: {getattr(exc, 'message', exc)}", soft_wrap=True)
