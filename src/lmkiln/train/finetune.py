"""`kiln finetune`: supervised fine-tuning on instruction data, full or LoRA, loss on replies only,
validation each epoch, and the best epoch kept."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmkiln.config import STAGES, Recipe
from lmkiln.device import autocast, pick_device, seed_everything
from lmkiln.errors import UserError
from lmkiln.io import atomic_dir, sha256_file
from lmkiln.log import console, progress
from lmkiln.model.hub import generation_eos, load_model, save_model
from lmkiln.model.lora import apply_lora, merge_lora, save_adapter
from lmkiln.pipeline import stage_dir, upstream
from lmkiln.tokenizer.train import load_tokenizer, special_ids
from lmkiln.train.formats import IGNORE, ChatFormat, collate, encode_all, load_splits, sample
from lmkiln.train.metrics import MetricsLog, plot_curves
from lmkiln.train.optim import adamw, cosine_lr, set_lr


def model_dir_of(run_dir: Path, ref: str) -> Path:
    """A stage name (its `final` model) or a model directory."""
    return stage_dir(run_dir, ref) / "final" if ref in STAGES else Path(ref)


def model_identity(run_dir: Path, ref: str) -> dict:
    if ref in STAGES:
        return upstream(run_dir, ref, sub="final")
    return {"path": str(Path(ref).resolve()), "weights": sha256_file(Path(ref) / "model.safetensors")}


def config_of(recipe: Recipe) -> dict:
    return {"finetune": recipe.finetune.model_dump(mode="json"), "seed": recipe.seed,
            "heldout_fraction": recipe.data.val_fraction}


def inputs_of(recipe: Recipe, run_dir: Path) -> dict:
    data = recipe.finetune.data
    ident = {"base": model_identity(run_dir, recipe.finetune.base)}
    if data.startswith("builtin:"):
        from lmkiln.data.builtin import stdlib_fingerprint

        ident["data"] = stdlib_fingerprint()
    elif Path(data).is_file():
        ident["data"] = sha256_file(data)
    return ident


@torch.no_grad()
def reply_loss(model, encoded: list, batch_size: int, pad_id: int, device) -> tuple[float, int]:
    """Summed next-token loss over reply tokens, and their count."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        x, y = collate(encoded[i:i + batch_size], pad_id)
        x, y = x.to(device), y.to(device)
        with autocast(device):
            logits = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum").item()
        count += int((y != IGNORE).sum())
    model.train()
    return total, count


class Validation:
    """The overfitting guards: validation loss on a schedule, the best state kept, early stopping after
    `patience` evaluations without improvement, and a warning when training loss keeps falling while
    validation loss rises."""

    def __init__(self, model, val: list, cfg, pad: int, device, log: MetricsLog) -> None:
        self.model, self.val, self.cfg, self.pad, self.device, self.log = model, val, cfg, pad, device, log
        self.base = self.best = self._loss()
        self.best_state, self.best_epoch, self.best_step = None, 0, 0
        self.history: list[tuple[float, float]] = []  # (mean train loss since the last check, val loss)
        self.train_losses: list[float] = []
        self.waited, self.stopped, self.diverged = 0, False, False
        log.log({"step": 0, "epoch": 0, "val_loss": round(self.base, 5)})
        console.print(f"base model: val loss {self.base:.4f}")

    def _loss(self) -> float:
        total, count = reply_loss(self.model, self.val, self.cfg.batch_size, self.pad, self.device)
        return total / count

    def check(self, step: int, epoch: int) -> bool:
        """Evaluate now; True when training should stop."""
        vloss = self._loss()
        train = sum(self.train_losses) / max(len(self.train_losses), 1)
        self.train_losses = []
        self.log.log({"step": step, "epoch": epoch, "val_loss": round(vloss, 5)})
        improved = vloss < self.best
        console.print(f"step {step} (epoch {epoch}): val loss {vloss:.4f}" + (" (best)" if improved else ""))
        if improved:
            state = self.model.state_dict()
            keep = {k: v.detach().clone() for k, v in state.items() if self.cfg.method != "lora" or ".lora_" in k}
            self.best, self.best_state, self.best_epoch, self.best_step, self.waited = vloss, keep, epoch, step, 0
        else:
            self.waited += 1
        self.history.append((train, vloss))
        if len(self.history) >= 3 and not self.diverged:
            (t0, v0), (t1, v1), (t2, v2) = self.history[-3:]
            if t2 < t1 < t0 and v2 > v1 > v0:
                self.diverged = True
                console.print("[yellow]warning: training loss falls while validation loss rises: the model is "
                              "overfitting (fewer epochs, a lower lr, or finetune.patience)[/yellow]")
        if self.cfg.patience and self.waited >= self.cfg.patience:
            console.print(f"stopping early: {self.waited} evaluations without improvement; "
                          f"keeping step {self.best_step}")
            self.stopped = True
        return self.stopped


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar-length examples: shuffle, sort within windows of 50 batches, cut,
    shuffle the batches. Padding drops several-fold while the order stays random."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lengths.__getitem__)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def preview(recipe: Recipe, n: int) -> None:
    """Print n training examples as the model sees them, the tokens the loss trains on highlighted."""
    from rich.console import Console
    from rich.text import Text

    out = Console(highlight=False)  # a result: stdout, even with -q
    cfg = recipe.finetune
    base_dir = model_dir_of(Path(recipe.run_dir), cfg.base)
    if not (base_dir / "config.json").is_file():
        raise UserError(f"finetune.base: no model at '{base_dir}' (run `kiln pretrain` first or name a model directory)")
    tok = load_tokenizer(base_dir)
    splits = load_splits(cfg.data, cfg.val_fraction, recipe.data.val_fraction, cfg.format, cfg.columns, cfg.on_bad_rows)
    chat = ChatFormat(base_dir)
    for ex in splits["train"][:n]:
        ids, labels = encode_all(tok, [ex], 10**9, chat, cfg.loss_on)[0][0]
        text = Text()
        for i, token in enumerate(ids):  # token i is trained when it is the label of position i - 1
            trained = i > 0 and labels[i - 1] != IGNORE
            text.append(tok.decode([token], skip_special_tokens=False), style="bold green" if trained else "dim")
        out.rule(f"{ex['id']}: {len(ids)} tokens, {sum(l != IGNORE for l in labels)} trained", style="dim")
        out.print(text)
    out.print(f"[dim]shown {min(n, len(splits['train']))} of {len(splits['train']):,} training examples; "
                  f"[bold green]trained tokens[/bold green] in green[/dim]")


def check_base(base_dir: Path) -> None:
    """The train/serve consistency checks on the base model, before any training: a chat template
    that does not render stops the run; the rest is reported."""
    from lmkiln.model.checks import consistency_checks, print_checks

    checks = consistency_checks(base_dir)
    console.print(f"base model checks ({base_dir}):")
    print_checks(checks)
    failed = [c for c in checks if c.status == "failed" and c.name == "chat template"]
    if failed:
        raise UserError(f"finetune.base: {base_dir}: chat template {failed[0].detail}")


def build(recipe: Recipe, run_dir: Path, out: Path) -> dict:
    cfg = recipe.finetune
    base_dir = model_dir_of(run_dir, cfg.base)
    if not (base_dir / "config.json").is_file():
        raise UserError(f"finetune.base: no model at '{base_dir}' (run `kiln pretrain` first or name a model directory)")
    device = pick_device(cfg.device)
    seed_everything(recipe.seed)
    tok = load_tokenizer(base_dir)
    pad = special_ids(tok)["pad"] or 0  # any id: padded positions are never attended to nor trained
    check_base(base_dir)
    splits = load_splits(cfg.data, cfg.val_fraction, recipe.data.val_fraction, cfg.format, cfg.columns, cfg.on_bad_rows)
    if cfg.task == "classify":
        from lmkiln.train.classify import build_classifier

        if cfg.max_examples:
            splits["train"] = sample(splits["train"], cfg.max_examples)
        return build_classifier(recipe, base_dir, splits, tok, out)
    chat = ChatFormat(base_dir)
    train_ex = sample(splits["train"], cfg.max_examples) if cfg.max_examples else splits["train"]
    train, too_long = encode_all(tok, train_ex, cfg.max_seq_len, chat, cfg.loss_on)
    val, _ = encode_all(tok, sample(splits["val"], cfg.max_val_examples), cfg.max_seq_len, chat, cfg.loss_on)
    if not train or not val:
        raise UserError(f"finetune.data: no training or validation examples fit in max_seq_len={cfg.max_seq_len}")
    console.print(f"examples: train {len(train):,} ({too_long} longer than {cfg.max_seq_len} tokens dropped), "
                  f"val {len(val):,}, test {len(splits['test']):,} (held out for eval)")

    model = load_model(base_dir, device)
    if cfg.method == "lora":
        wrapped = apply_lora(model, cfg.lora.targets, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)
        model.to(device)
        console.print(f"LoRA r={cfg.lora.r} on {len(wrapped)} layers")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    console.print(f"trainable parameters: {trainable / 1e6:.2f}M")
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / (cfg.batch_size * cfg.grad_accum))
    max_steps = steps_per_epoch * cfg.epochs
    log = MetricsLog(out / "metrics.jsonl")

    guard = Validation(model, val, cfg, pad, device, log)
    rng = random.Random(recipe.seed)
    step, t0, tokens = 0, time.perf_counter(), 0
    model.train()
    with progress("loss {task.fields[loss]:.3f} · {task.fields[tps]:,.0f} tok/s") as bar:
        task = bar.add_task("finetune", total=max_steps, loss=float("nan"), tps=0.0)
        for epoch in range(1, cfg.epochs + 1):
            micro = length_grouped_batches([len(ids) for ids, _ in train], cfg.batch_size, rng)
            for s in range(0, len(micro), cfg.grad_accum):
                set_lr(opt, cosine_lr(step, max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio))
                group = micro[s:s + cfg.grad_accum]
                n_target = sum(sum(l != IGNORE for l in train[i][1]) for idx in group for i in idx)
                loss_sum = 0.0
                for idx in group:
                    x, y = collate([train[i] for i in idx], pad)
                    x, y = x.to(device), y.to(device)
                    with autocast(device):
                        logits = model(x)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
                    (loss / n_target).backward()
                    loss_sum += loss.item()
                    tokens += x.numel()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                tps = tokens / (time.perf_counter() - t0)
                guard.train_losses.append(loss_sum / n_target)
                if step % cfg.log_every == 0:
                    log.log({"step": step, "epoch": epoch, "loss": round(loss_sum / n_target, 5), "tokens_per_s": round(tps, 1)})
                bar.update(task, completed=step, loss=loss_sum / n_target, tps=tps)
                if cfg.eval_every and step % cfg.eval_every == 0 and guard.check(step, epoch):
                    break
            if guard.stopped or (not cfg.eval_every and guard.check(step, epoch)):
                break

    if guard.best_state is not None:
        model.load_state_dict(guard.best_state, strict=False)
    else:
        console.print("[yellow]warning: no evaluation improved on the base model's validation loss; keeping the base weights[/yellow]")
        model = load_model(base_dir, device)
        if cfg.method == "lora":
            apply_lora(model, cfg.lora.targets, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)
    if cfg.method == "lora":
        with atomic_dir(out / "adapter") as tmp:
            save_adapter(model, tmp, str(base_dir), cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
        merge_lora(model)
    end = special_ids(tok)["end"]
    with atomic_dir(out / "final") as tmp:
        save_model(model, tmp, base_dir, generation_eos(base_dir) + ([end] if end is not None else []))
    plot_curves(out / "metrics.jsonl", out / "loss.png", "fine-tuning")
    return {"method": cfg.method, "examples": len(train), "dropped_too_long": too_long,
            "skipped_rows": len(splits["skipped"]), "steps": step,
            "best_epoch": guard.best_epoch, "best_step": guard.best_step, "best_val_loss": round(guard.best, 5),
            "base_val_loss": round(guard.base, 5), "stopped_early": guard.stopped, "overfit_warning": guard.diverged,
            "trainable_parameters": trainable,
            "total_parameters": model.args.num_params(),
            "tokens_per_s": round(tokens / (time.perf_counter() - t0), 1)}

