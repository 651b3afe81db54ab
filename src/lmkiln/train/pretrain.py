"""`kiln pretrain`: next-token prediction on packed token shards, on one device or under torchrun
(DDP / FSDP2), resumable from the last checkpoint to the exact loss curve."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from lmkiln.config import Recipe
from lmkiln.device import autocast, seed_everything
from lmkiln.errors import UserError
from lmkiln.eval.during import TaskMonitor, describe
from lmkiln.io import sha256_json
from lmkiln.log import console, set_quiet
from lmkiln.model.families import FAMILIES, family_of, family_of_arch
from lmkiln.model.io.chat_format import ChatFormat
from lmkiln.model.io.hub import build_model, recipe_model_args
from lmkiln.model.loss import next_token_losses
from lmkiln.runs import CHECKPOINTS, FINAL, stage_dir, upstream
from lmkiln.tokenizer.encode import open_shard
from lmkiln.tokenizer.train import load_tokenizer, special_ids, tokenizer_kind, vocabulary_label, word_starts
from lmkiln.train import dist
from lmkiln.train.checkpoint import latest_checkpoint, prune, read_checkpoint, save_checkpoint
from lmkiln.train.loop import Cadence, LoopState, Plan, train
from lmkiln.train.metrics import Tracker, plot_curves
from lmkiln.train.mlm import MaskedLM
from lmkiln.train.optim import cosine_lr, make_optimizer, wsd_lr
from lmkiln.train.seq2seq import SpanCorruption
from lmkiln.train.speed import device_peak


def check(recipe: Recipe, will_run: list[str]) -> None:
    family_of_arch(recipe.model.arch)  # a family lmkiln pretrains
    if recipe.pretrain.eval_tasks:  # every task line read now, not at the first validation
        TaskMonitor(recipe.pretrain.eval_tasks, recipe, recipe.pretrain.eval_tasks_max_examples)


def config_of(recipe: Recipe) -> dict:
    cfg = recipe.pretrain.model_dump(mode="json")
    # how a run goes and what it reports, not what it computes
    for key in ("log_every", "tracker", "keep_checkpoints", "stop_after", "eval_tasks", "eval_tasks_max_examples"):
        cfg.pop(key)
    model = recipe.model.model_dump(mode="json")
    # other families' own settings: a run stays current when a key its family never reads changes
    family = family_of_arch(recipe.model.arch)
    sections = {"model": model, "pretrain": cfg}
    for other in FAMILIES:
        for key in other.config_keys if other is not family else ():
            section, name = key.split(".")
            sections[section].pop(name)
    return {"model": model, "pretrain": cfg, "seed": recipe.seed}


def inputs_of(recipe: Recipe) -> dict:
    return {"tokenizer": upstream(recipe.run_dir, "tokenizer")}


def fim_rearrange(window: np.ndarray, rng: np.random.Generator, prefix: int, middle: int, suffix: int) -> np.ndarray:
    """Fill-in-the-middle (Bavarian et al. 2022, PSM order): cut the window at two random points and
    move the middle span to the end behind sentinels, so next-token prediction learns to fill a gap
    from both sides. The result keeps the window's length (its last 3 tokens fall off)."""
    n = len(window)
    a, b = np.sort(rng.integers(0, n + 1, size=2))
    out = np.concatenate([[prefix], window[:a], [suffix], window[b:], [middle], window[a:b]])
    return out[:n]


def batch_at(
    tokens: np.ndarray,
    seed: int,
    step: int,
    micro: int,
    batch: int,
    seq_len: int,
    fim: tuple[float, int, int, int] | None = None,
):
    """The micro-batch of a step: random windows drawn from a generator keyed by (seed, step, micro).
    The data position is the step number, so resume needs no sampler state; under torchrun rank r
    draws micro-batch `micro * world + r`, so N ranks see what one process with N× accumulation sees.
    `fim` = (rate, prefix id, middle id, suffix id) rearranges that share of the windows."""
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch)
    windows = [np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts]
    if fim is not None and fim[0] > 0:
        windows = [fim_rearrange(w, rng, *fim[1:]) if rng.random() < fim[0] else w for w in windows]
    chunk = torch.from_numpy(np.stack(windows))
    return chunk[:, :-1], chunk[:, 1:]


def next_token_loss(run: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of every next token; `run` is what runs the forward (maybe compiled),
    `model` what owns the parameters. The LM head runs inside the loss, a chunk at a time (model/loss.py);
    under FSDP the head's weight is whole only inside the model's own forward, so there the model runs it."""
    head = None if dist.is_sharded(model) else dist.unwrap(model).lm_head.weight
    return next_token_losses(run, x, y, head, dense=True)[0].sum()


@torch.no_grad()
def val_loss(model, tokens: np.ndarray, seq_len: int, batches: int, batch: int, ctx: dist.DistContext) -> float:
    """Mean loss over fixed evenly spaced windows of the validation tokens, split across ranks."""
    model.eval()
    n = min(batches * batch, max(1, (len(tokens) - 1) // seq_len))
    n = max(ctx.world, n - n % ctx.world)  # equal work per rank: FSDP's forward is collective
    starts = np.linspace(0, len(tokens) - seq_len - 1, n).astype(np.int64)[ctx.rank :: ctx.world]
    total, count = 0.0, 0
    for i in range(0, len(starts), batch):
        chunk = torch.from_numpy(
            np.stack([tokens[s : s + seq_len + 1] for s in starts[i : i + batch]]).astype(np.int64)
        )
        x, y = chunk[:, :-1].to(ctx.device), chunk[:, 1:].to(ctx.device)
        with autocast(ctx.device):
            total += next_token_loss(model, model, x, y).item()
        count += y.numel()
    model.train()
    total, count = dist.all_sum([total, count], ctx)
    return total / count


def _grad_accum(recipe: Recipe, world: int) -> int:
    cfg = recipe.pretrain
    if cfg.batch_tokens is None:
        return cfg.grad_accum
    per_micro = cfg.batch_size * cfg.seq_len * world
    return max(1, math.ceil(cfg.batch_tokens / per_micro))


def _check(recipe: Recipe, train_tokens: np.ndarray, val_tokens: np.ndarray, ids: dict, tokenizer_kind: str) -> None:
    cfg = recipe.pretrain
    if len(train_tokens) <= cfg.seq_len + 1:
        raise UserError(f"pretrain.seq_len={cfg.seq_len} is longer than the training data ({len(train_tokens)} tokens)")
    if len(val_tokens) <= cfg.seq_len + 1:
        raise UserError(
            f"pretrain.seq_len={cfg.seq_len} is longer than the validation split ({len(val_tokens)} tokens); "
            f"raise data.val_fraction or lower pretrain.seq_len"
        )
    if cfg.seq_len > recipe.model.max_seq_len:
        raise UserError(f"pretrain.seq_len={cfg.seq_len} exceeds model.max_seq_len={recipe.model.max_seq_len}")
    if cfg.fim_rate > 0 and ids.get("fim_prefix") is None:
        raise UserError("pretrain.fim_rate needs a tokenizer with FIM tokens: rerun `kiln tokenizer --force`")
    family, arch, have = family_of_arch(recipe.model.arch), recipe.model.arch, tokenizer_kind
    if have != family.tokenizer_kind:
        raise UserError(
            f"model.arch={arch} needs {vocabulary_label(family.tokenizer_kind)}, but the tokenizer has "
            f"{vocabulary_label(have)}: set tokenizer.kind={family.tokenizer_kind} and rerun `kiln tokenizer`"
        )
    if family.objective != "causal" and cfg.eval_tasks:
        raise UserError(f"pretrain.eval_tasks score a decoder's continuations: leave them out for model.arch={arch}")
    if cfg.optimizer == "muon" and cfg.strategy == "fsdp":
        raise UserError(
            "pretrain.optimizer=muon with pretrain.strategy=fsdp is not supported: Muon needs whole matrices"
        )


def _make_model(recipe: Recipe, vocab_size: int, ids: dict, ctx: dist.DistContext) -> tuple[torch.nn.Module, object]:
    try:
        args = recipe_model_args(recipe.model, vocab_size, ids)
    except ValueError as exc:
        raise UserError(f"model: {exc}") from None
    seed_everything(recipe.seed)
    model = build_model(args)
    model.init_weights(torch.Generator().manual_seed(recipe.seed))
    return model.to(ctx.device).train(), args


def build(recipe: Recipe, out: Path, on_step=None) -> dict:
    ctx = dist.setup(recipe.pretrain.device)
    if not ctx.is_main:
        set_quiet(True)
    try:
        return _train(recipe, out, ctx, on_step)
    except torch.cuda.OutOfMemoryError:
        raise UserError(
            f"out of GPU memory: lower pretrain.batch_size (now {recipe.pretrain.batch_size}) and raise "
            f"pretrain.grad_accum, lower pretrain.seq_len, or shard with pretrain.strategy=fsdp"
        ) from None
    finally:
        dist.teardown(ctx)


def _resume(path: Path | None, model: torch.nn.Module, opt) -> tuple[int, LoopState | None]:
    """Model, optimizer and RNG from the newest matching checkpoint: (its step, the loop's state)."""
    if path is None:
        return 0, None
    model_state, state = read_checkpoint(path)
    dist.load_full_state(model, opt, model_state, state["optimizer"])
    console.print(f"resuming from {path} (step {state['step']})")
    return state["step"], LoopState(**state["loop"])


def _print_setup(args, cfg, accum: int, tokens_per_step: int, flops_per_token: float, ctx: dist.DistContext) -> None:
    peak, peak_source = device_peak(ctx.device)
    console.print(
        f"model: {args.arch}, {args.num_params() / 1e6:.2f}M parameters, {args.num_layers} layers, "
        f"hidden {args.hidden_size}, vocab {args.vocab_size}; {flops_per_token / 1e6:.1f} MFLOPs/token"
    )
    console.print(
        f"batch: {tokens_per_step:,} tokens/step ({cfg.batch_size} × {cfg.seq_len} × {accum} accum × "
        f"{ctx.world} rank{'s' if ctx.world > 1 else ''}) on {ctx.device}"
        + (f", {cfg.strategy}" if ctx.enabled else "")
        + (f"; peak {peak / 1e9:,.0f} GFLOP/s ({peak_source})" if peak else f"; {peak_source}")
    )


def _read_tokenizer_stage(recipe: Recipe, tok_dir: Path) -> tuple[tuple[np.ndarray, np.ndarray], int, object, dict]:
    """The token shards (train, val), the vocabulary size, the tokenizer and its special ids, checked
    against the recipe before any model is built."""
    train_tokens, header = open_shard(tok_dir / "train")
    val_tokens, _ = open_shard(tok_dir / "val")
    tok = load_tokenizer(tok_dir)
    ids = special_ids(tok)
    _check(recipe, train_tokens, val_tokens, ids, tokenizer_kind(tok))
    return (train_tokens, val_tokens), header["vocab_size"], tok, ids


def _train(recipe: Recipe, out: Path, ctx: dist.DistContext, on_step) -> dict:
    cfg = recipe.pretrain
    tok_dir = stage_dir(recipe.run_dir, "tokenizer")
    (train_tokens, val_tokens), vocab_size, tok, ids = _read_tokenizer_stage(recipe, tok_dir)
    monitor = TaskMonitor(cfg.eval_tasks, recipe, cfg.eval_tasks_max_examples) if cfg.eval_tasks else None
    model, args = _make_model(recipe, vocab_size, ids, ctx)
    config_hash = sha256_json(config_of(recipe))
    ckpt_dir = out / CHECKPOINTS
    dist.barrier(ctx)  # every rank looks for checkpoints only after rank 0 has cleared a --force run
    resume = latest_checkpoint(ckpt_dir, config_hash)
    model = dist.wrap(model, cfg.strategy, ctx)
    opt = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    start, loop_state = _resume(resume, model, opt)
    step_model = torch.compile(model) if cfg.compile else model
    accum = _grad_accum(recipe, ctx.world)
    tokens_per_step = cfg.batch_size * accum * cfg.seq_len * ctx.world
    objective = _objective(recipe, model, args, tok, ids, (train_tokens, val_tokens), accum, ctx)
    flops_per_token = objective.flops_per_token(args)
    _print_setup(args, cfg, accum, tokens_per_step, flops_per_token, ctx)
    track = Tracker(out, start, ctx.is_main, cfg.tracker)
    plan = Plan(
        "pretrain",
        cfg.max_steps,
        objective.micro_batches,
        weight=objective.weight,
        loss=objective.loss,
        lr=partial(lr_at, cfg),
        flops_per_token=flops_per_token,
        device=ctx.device,
        prefetch=ctx.device.type != "cpu",
    )
    evaluate = _Evaluate(recipe, model, objective, ctx, monitor, tok, ChatFormat(tok_dir))
    save = _saver(recipe, model, opt, args, ckpt_dir, config_hash, tok_dir, ids["end"], ctx)
    cadence = Cadence(
        cfg.log_every,
        lambda step: step % cfg.eval_every == 0 or step == cfg.max_steps,
        evaluate,
        save,
        cfg.checkpoint_every,
        cfg.grad_clip,
        cfg.on_nan,
        stop_after=cfg.stop_after,
        on_step=on_step,
    )
    result = train(plan, cadence, step_model, model, opt, ctx, track, start, loop_state)
    save(result.steps, {}, out / FINAL)
    track.close()
    if ctx.is_main:
        plot_curves(out / "metrics.jsonl", out / "loss.png", "pretraining")
    return _metrics(result, args, tokens_per_step, ctx, evaluate.last_scores)


def _metrics(result, args, tokens_per_step: int, ctx: dist.DistContext, task_scores: dict | None) -> dict:
    """The stage's metrics: losses, size, tokens, speed, the last in-training task scores."""
    last_val = result.last_eval["val_loss"] if result.last_eval else None
    return {
        "final_loss": round(result.train_loss, 5) if result.train_loss is not None else None,
        "val_loss": last_val,
        "parameters": args.num_params(),
        "tokens_seen": result.steps * tokens_per_step,
        **result.metrics(),
        "mfu": round(result.mfu, 4) if result.mfu else None,
        "device": str(ctx.device),
        "world_size": ctx.world,
        **({"eval_tasks": task_scores} if task_scores else {}),
    }


def _saver(
    recipe: Recipe, model, opt, args, ckpt_dir: Path, config_hash: str, tok_dir: Path, end: int | None, ctx
) -> Callable[..., None]:
    """The loop's `save(step, loop_state, path=None)`: the whole model and optimizer state (gathered from
    every rank) as a checkpoint, the last `keep_checkpoints` kept, or at `path` (the final model)."""

    def save(at_step: int, loop_state: dict, path: Path | None = None) -> None:
        model_state, optim_state = dist.full_state(model, opt)  # collective
        if ctx.is_main:
            save_checkpoint(
                path or ckpt_dir / f"step_{at_step:07d}",
                args,
                model_state,
                optim_state,
                at_step,
                config_hash,
                tok_dir,
                [end],
                extra={"loop": loop_state},
            )
            if path is None:
                prune(ckpt_dir, recipe.pretrain.keep_checkpoints)
        dist.barrier(ctx)

    return save


def _objective(recipe: Recipe, model, args, tok, ids: dict, tokens: tuple, accum: int, ctx: dist.DistContext):
    """The family's pretraining objective (causal, masked-LM or span corruption) on the token shards."""
    cfg, objective = recipe.pretrain, family_of(args).objective
    if objective == "span":
        return SpanCorruption(recipe, model, *tokens, accum, ctx, ids)
    if objective == "mlm":
        starts = word_starts(tok) if cfg.whole_word_mask else None
        return MaskedLM(recipe, model, *tokens, accum, ctx, ids, args.vocab_size, starts)
    fim = (cfg.fim_rate, ids["fim_prefix"], ids["fim_middle"], ids["fim_suffix"]) if cfg.fim_rate else None
    return CausalLM(recipe, model, *tokens, accum, ctx, fim)


def lr_at(cfg, step: int) -> float:
    if cfg.schedule == "wsd":
        return wsd_lr(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio, cfg.decay_fraction)
    return cosine_lr(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)


class CausalLM:
    """Pretraining's objective for a decoder: next-token prediction on random windows, every position
    trained (see `batch_at`), and the validation loss on fixed windows."""

    def __init__(
        self,
        recipe: Recipe,
        model,
        train_tokens: np.ndarray,
        val_tokens: np.ndarray,
        accum: int,
        ctx: dist.DistContext,
        fim,
    ) -> None:
        self.recipe, self.model, self.train, self.val = recipe, model, train_tokens, val_tokens
        self.accum, self.ctx, self.fim = accum, ctx, fim
        c = recipe.pretrain
        self.tokens_per_step = c.batch_size * accum * c.seq_len * ctx.world

    def micro_batches(self, step: int) -> list:
        """This rank's micro-batches of a step, in host memory (pinned on CUDA for asynchronous copies)."""
        c, ctx, out = self.recipe.pretrain, self.ctx, []
        for micro in range(self.accum):
            x, y = batch_at(
                self.train, self.recipe.seed, step, micro * ctx.world + ctx.rank, c.batch_size, c.seq_len, self.fim
            )
            out.append((x.pin_memory(), y.pin_memory()) if ctx.device.type == "cuda" else (x, y))
        return out

    def weight(self, step: int) -> float:
        return self.tokens_per_step

    def loss(self, run: torch.nn.Module, batch) -> tuple[torch.Tensor, int]:
        x, y = (t.to(self.ctx.device, non_blocking=True) for t in batch)
        with autocast(self.ctx.device):
            return next_token_loss(run, self.model, x, y), x.numel()

    def val_loss(self) -> float:
        c = self.recipe.pretrain
        return val_loss(self.model, self.val, c.seq_len, c.eval_batches, c.batch_size, self.ctx)

    def flops_per_token(self, args) -> float:
        return args.flops_per_token(self.recipe.pretrain.seq_len)


@dataclass
class _Evaluate:
    """The validation loss on a schedule, and the in-context tasks when the recipe names them."""

    recipe: Recipe
    model: torch.nn.Module
    objective: CausalLM | MaskedLM
    ctx: dist.DistContext
    monitor: TaskMonitor | None
    tok: object
    chat: ChatFormat  # the tokenizer's format: its bos/eos for the task monitor
    last_scores: dict | None = None

    def __call__(self, step: int, train_loss: float) -> tuple[dict, bool]:
        loss = self.objective.val_loss()
        fields = {"val_loss": round(loss, 5)}
        message = f"step {step}: train loss {train_loss:.4f}, val loss {loss:.4f}"
        if self.monitor is not None:
            self.last_scores = self.monitor(dist.unwrap(self.model), self.tok, self.chat)
            fields.update(self.last_scores)
            message += f"; {describe(self.last_scores)}"
        console.print(message)
        return fields, False
