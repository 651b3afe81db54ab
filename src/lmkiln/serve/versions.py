"""Model versions behind one served name. A version is one model directory (with its LoRA adapters)
loaded with what serves it: the continuous-batching engine for a decoder, the encoder or T5 service
otherwise. A new version is loaded beside the running one, must pass its load checks (the
train/serve consistency checks, then a smoke generation), and only then takes new requests; requests
already running finish on the version they started on, which is then closed once idle. The version it
replaced stays loaded, so a rollback is instant."""

from __future__ import annotations

import itertools
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from lmkiln.errors import UserError
from lmkiln.serve.protocol import ApiError

LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Version:
    """One loaded model directory and what serves it; `kind` is decoder, encoder or encoder-decoder."""

    def __init__(
        self,
        label: str,
        model_dir: Path,
        adapter_dirs: dict[str, Path],
        device: str,
        max_batch: int,
        max_queue: int,
        context: int | None,
        on_finish,
        prefix_cache_bytes: int = 64 << 20,
    ) -> None:
        from lmkiln.device import pick_device
        from lmkiln.serve.encoding import EncoderService, is_encoder
        from lmkiln.serve.seq2seq import Seq2SeqService, is_seq2seq

        self.label, self.model_dir, self.adapter_dirs = label, Path(model_dir), dict(adapter_dirs)
        self.loaded_at = time.time()
        self.engine = self.encoder = self.seq2seq = None
        self.adapters: dict[str, int] = {}
        where = pick_device(device)
        seq2seq, encoder = is_seq2seq(self.model_dir), is_encoder(self.model_dir)
        if (seq2seq or encoder) and adapter_dirs:
            raise UserError("adapters: adapters are served on a decoder; merge them into the model instead")
        if seq2seq:
            self.seq2seq = Seq2SeqService(self.model_dir, where)
            return
        if encoder:
            self.encoder = EncoderService(self.model_dir, where)
            return
        from lmkiln.model.inference.load import load_for_inference
        from lmkiln.serve.adapters import AdapterSet
        from lmkiln.serve.batching import Engine

        lm = load_for_inference(self.model_dir, where)
        self.tok, self.chat = lm.tok, lm.chat
        self.stop_ids = lm.chat.stop_ids
        adapter_set = AdapterSet(lm.model) if adapter_dirs else None
        self.adapters = {n: adapter_set.add(n, d) for n, d in adapter_dirs.items()}
        self.engine = Engine(
            lm.model,
            max_batch,
            max_queue,
            context,
            adapter_set,
            on_finish=on_finish,
            prefix_cache_bytes=prefix_cache_bytes,
        )
        from lmkiln.serve.constraints import Grammars

        self.grammars = Grammars(self.tok.to_str(), lm.model.args.vocab_size, self.stop_ids)

    @property
    def kind(self) -> str:
        return "encoder" if self.encoder else "encoder-decoder" if self.seq2seq else "decoder"

    @property
    def context(self) -> int:
        return (self.engine or self.encoder or self.seq2seq).context

    def idle(self) -> bool:
        return self.engine is None or (self.engine.queue_depth == 0 and self.engine.batch_size == 0)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    def encode(self, text: str, param: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if not ids:
            raise ApiError(400, f"{param}: empty after tokenisation", param)
        if len(ids) >= self.engine.context:
            raise ApiError(400, f"{param}: {len(ids)} tokens; the context is {self.engine.context} (--context)", param)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def smoke(self, timeout: float = 120.0) -> None:
        """Serve one short request end to end; a UserError saying what went wrong when it fails."""
        if self.encoder is not None:
            vectors, _ = self.encoder.embeddings(["Hello."])
            if not all(map(_finite, vectors)):
                raise UserError("smoke test: the embedding of 'Hello.' is not finite")
            return
        if self.seq2seq is not None:
            self.seq2seq.complete("Hello.", SimpleNamespace(seed=None, temperature=0.0, top_p=1.0), 4, "smoke")
            return
        self._smoke_generation(timeout)

    def _smoke_generation(self, timeout: float) -> None:
        from lmkiln.model.io.chat_format import PROBE
        from lmkiln.serve.batching import Sampling, Sequence

        text = self.chat.render(PROBE[:2], add_generation_prompt=True)
        prompt = self.tok.encode(text, add_special_tokens=False).ids[-(self.engine.context // 2) :] or [0]
        events, done = [], threading.Event()

        def emit(event) -> None:
            events.append(event)
            if isinstance(event, str):
                done.set()

        self.engine.submit(Sequence(prompt, Sampling(4, temperature=0.0, logprobs=0), emit, self.stop_ids))
        if not done.wait(timeout):
            raise UserError(f"smoke test: no reply to a 4-token generation within {timeout:.0f} s")
        if events[-1].startswith("error"):
            raise UserError(f"smoke test: generation failed ({events[-1]})")
        if not all(_finite([e.logprob]) for e in events[:-1]):
            raise UserError("smoke test: the model's log-probabilities are not finite (NaN or infinite weights?)")


def _finite(values: list[float]) -> bool:
    return bool(torch.isfinite(torch.tensor(values, dtype=torch.float64)).all())


class Versions:
    """The versions of one served name: `active` takes new requests, `previous` is kept for rollback,
    and replaced ones drain (finish their requests) before they close."""

    def __init__(self, name: str, load_version, on_activate) -> None:
        self.name, self._load, self._on_activate = name, load_version, on_activate
        self.active: Version | None = None
        self.previous: Version | None = None
        self.draining: list[Version] = []
        self.history: list[dict] = []  # swaps and rollbacks, for GET /admin/models
        self.busy = threading.Lock()  # one load at a time
        self.numbers = itertools.count(1)

    def loaded(self) -> list[Version]:
        return [v for v in (self.active, self.previous, *self.draining) if v is not None]

    def build(self, model_dir: Path, adapters: dict[str, Path], label: str | None, checks: bool = True) -> Version:
        """Load a version and run its load checks (on the caller's thread: it takes seconds to minutes).
        The first version skips the consistency checks: with nothing to keep serving, `kiln serve` serves
        what it was given, as it always has, and `kiln finetune` ran them when the model was written."""
        from lmkiln.model.inference.load import check_model_dir
        from lmkiln.model.io.checks import consistency_checks

        check_model_dir(model_dir)
        label = label or self._next_label()
        if not LABEL.fullmatch(label):
            raise UserError(f"version '{label}': expected letters, digits, '.', '_' or '-' (at most 64)")
        if any(v.label == label for v in self.loaded()):
            raise UserError(f"version '{label}' is loaded already; name the new one differently")
        failed = [c for c in consistency_checks(model_dir) if c.status == "failed"] if checks else []
        if failed:
            raise UserError(f"{model_dir}: consistency check '{failed[0].name}' failed: {failed[0].detail}")
        version = self._load(label, Path(model_dir), adapters)
        try:
            if self.active is not None and version.kind != self.active.kind:
                raise UserError(
                    f"{model_dir} is an {version.kind} model; version {self.active.label} is a {self.active.kind}: "
                    "a version must answer the routes its clients use"
                )
            version.smoke()
        except Exception:
            version.close()
            raise
        return version

    def _next_label(self) -> str:
        taken = {v.label for v in self.loaded()} | {h["version"] for h in self.history}
        return next(f"v{n}" for n in self.numbers if f"v{n}" not in taken)

    def activate(self, version: Version) -> None:
        """Send new requests to `version`, keeping the one it replaces for rollback. Called on the event
        loop's thread: a request picks its version and submits to it in one step, so none can reach a
        version after it closed."""
        if self.previous is not None:
            self.retire(self.previous)
        self.previous, self.active = self.active, version
        self._record("load", version)

    def rollback(self) -> Version:
        """Back to the previous version; the one rolled back drains and closes (on the loop's thread)."""
        if self.previous is None:
            raise ApiError(409, "no previous version to roll back to")
        bad, self.active, self.previous = self.active, self.previous, None
        self.retire(bad)
        self._record("rollback", self.active)
        return self.active

    def _record(self, event: str, version: Version) -> None:
        entry = {"event": event, "version": version.label, "path": str(version.model_dir), "at": time.time()}
        self.history.append(entry)
        self._on_activate(version.label)

    def retire(self, version: Version) -> None:
        """Close `version` once its running requests finish (on a thread: the caller does not wait)."""
        self.draining.append(version)

        def drain() -> None:
            while not version.idle():
                time.sleep(0.05)
            version.close()
            self.draining.remove(version)

        threading.Thread(target=drain, name=f"lmkiln-drain-{version.label}", daemon=True).start()

    def pick(self, requested: str | None) -> tuple[Version, str | None]:
        """The version and adapter a request's `model` names: NAME, NAME@VERSION, and either +ADAPTER (once a
        version is active: Server.pick answers 503 before, with the load error when there is one)."""
        if requested in (None, "", self.name):
            return self.active, None
        base, _, adapter = requested.partition("+")
        name, _, label = base.partition("@")
        live = {v.label: v for v in (self.active, self.previous) if v is not None}
        version = live.get(label) if label else self.active
        if name != self.name or version is None or (adapter and adapter not in version.adapters):
            served = ", ".join(self.model_ids())
            raise ApiError(404, f"model '{requested}' is not served here (serving {served})", "model")
        return version, adapter or None

    def served_id(self, version: Version, adapter: str | None = None) -> str:
        """The `model` a response names: the version that answered, and the adapter."""
        return f"{self.name}@{version.label}" + (f"+{adapter}" if adapter else "")

    def model_ids(self) -> list[str]:
        ids = [self.name]
        if self.active is not None:
            ids += [f"{self.name}+{a}" for a in self.active.adapters]
            ids += [self.served_id(v) for v in (self.active, self.previous) if v is not None]
        return ids

    def describe(self) -> list[dict]:
        states = [(self.active, "active"), (self.previous, "previous")] + [(v, "draining") for v in self.draining]
        return [
            {
                "version": v.label,
                "state": state,
                "path": str(v.model_dir),
                "adapters": {n: str(d) for n, d in v.adapter_dirs.items()},
                "kind": v.kind,
                "loaded_at": int(v.loaded_at),
            }
            for v, state in states
            if v is not None
        ]

    def close(self) -> None:
        for v in self.loaded():
            v.close()
