"""`finetune.task: dpo`: Direct Preference Optimization (Rafailov et al. 2023) on {prompt, chosen,
rejected} pairs, full or LoRA/DoRA.

    loss = -log σ(β · [(log π(chosen) - log π_ref(chosen)) - (log π(rejected) - log π_ref(rejected))])

where log π(reply) sums the log-probabilities of the reply's tokens (its end-of-turn included) given
the prompt. The reference is the base model, which the policy equals before its first step, so the
reference log-probabilities are computed once up front by the policy itself: no second model in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lmkiln.data.examples import collate, encode_example, preference_pair, sample
from lmkiln.device import autocast, pick_device
from lmkiln.errors import UserError
from lmkiln.eval.during import TaskMonitor
from lmkiln.log import console
from lmkiln.model.chat_format import ChatFormat
from lmkiln.model.loss import next_token_losses
from lmkiln.train.dist import DistContext, unwrap
from lmkiln.train.estimate import print_memory
from lmkiln.train.metrics import plot_curves
from lmkiln.train.tuning import Checkpoints, Validation, load_trainable, run_epochs, save_tuned


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and implicit reward margins, from summed reply log-probabilities."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin), margin


def reply_logprobs(model, encoded: list[tuple[list[int], list[int]]], pad_id: int, device) -> torch.Tensor:
    """Summed log-probability of each sequence's trained tokens (its reply)."""
    x, y, _ = collate(encoded, pad_id)
    x, y = x.to(device), y.to(device)
    with autocast(device):
        loss, rows = next_token_losses(model, x, y, unwrap(model).lm_head.weight)
    return torch.zeros(len(x), device=device).index_add(0, rows, -loss)


def encode_pairs(tok, examples: list[dict], max_len: int, chat: ChatFormat) -> tuple[list[dict], int]:
    """Chosen and rejected conversations encoded with only the final reply trained; pairs where either
    is longer than max_len are dropped (and counted)."""
    pairs, too_long = [], 0
    for ex in examples:
        chosen, rejected = (encode_example(tok, part, chat, last_reply_only=True) for part in preference_pair(ex))
        if max(len(chosen[0]), len(rejected[0])) > max_len:
            too_long += 1
        else:
            pairs.append({"chosen": chosen, "rejected": rejected})
    return pairs, too_long


def policy_logprobs(model, batch: list[dict], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over a batch's chosen and rejected sequences together."""
    logp = reply_logprobs(model, [p["chosen"] for p in batch] + [p["rejected"] for p in batch], pad, device)
    return logp[: len(batch)], logp[len(batch) :]


@torch.no_grad()
def add_reference(model, pairs: list[dict], batch_size: int, pad: int, device) -> None:
    model.eval()
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i : i + batch_size]
        chosen, rejected = policy_logprobs(model, batch, pad, device)
        for p, c, r in zip(batch, chosen.tolist(), rejected.tolist()):
            p["ref_chosen"], p["ref_rejected"] = c, r


def batch_loss(model, batch: list[dict], beta: float, pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, rejected = policy_logprobs(model, batch, pad, device)
    ref_c = torch.tensor([p["ref_chosen"] for p in batch], device=device)
    ref_r = torch.tensor([p["ref_rejected"] for p in batch], device=device)
    return dpo_loss(chosen, rejected, ref_c, ref_r, beta)


def build_dpo(
    recipe,
    base_dir: Path,
    splits: dict,
    tok,
    out: Path,
    on_eval: Callable[[int, float], None] | None = None,
    save: bool = True,
    ctx: DistContext | None = None,
    monitor: TaskMonitor | None = None,
    checkpoints: Checkpoints | None = None,
) -> dict:
    cfg = recipe.finetune
    ctx = ctx or DistContext(device=pick_device(cfg.device))
    device = ctx.device
    chat = ChatFormat(base_dir)
    pad = chat.pad
    train, too_long = encode_pairs(tok, splits["train"], cfg.max_seq_len, chat)
    val, _ = encode_pairs(tok, sample(splits["val"], cfg.max_val_examples), cfg.max_seq_len, chat)
    if not train or not val:
        raise UserError(f"finetune.data: no training or validation pairs fit in max_seq_len={cfg.max_seq_len}")
    console.print(
        f"preference pairs: train {len(train):,} ({too_long} longer than {cfg.max_seq_len} tokens dropped), "
        f"val {len(val):,}; beta {cfg.dpo_beta}"
    )
    model, trainable = load_trainable(base_dir, cfg, device)
    longest = max(max(len(p["chosen"][0]), len(p["rejected"][0])) for p in train)
    print_memory(model, cfg, longest, pairs=2)
    add_reference(model, train + val, cfg.batch_size, pad, device)

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        losses, margins = [], []
        for i in range(0, len(val), cfg.batch_size):
            loss, margin = batch_loss(model, val[i : i + cfg.batch_size], cfg.dpo_beta, pad, device)
            losses.append(loss)
            margins.append(margin)
        model.train()
        loss, margin = torch.cat(losses), torch.cat(margins)
        wins = (margin > 0).float() + 0.5 * (margin == 0).float()  # a tie is a coin flip
        return {
            "loss": loss.mean().item(),
            "reward_accuracy": wins.mean().item(),
            "reward_margin": margin.mean().item() / cfg.dpo_beta,
        }

    def micro_loss(net, batch: list[dict]) -> tuple[torch.Tensor, int]:
        loss, _ = batch_loss(net, batch, cfg.dpo_beta, pad, device)
        return loss.sum(), sum(len(p["chosen"][0]) + len(p["rejected"][0]) for p in batch)

    guard = Validation(model, evaluate, cfg, on_eval, monitor and (lambda: monitor(model, tok, chat)))
    lengths = [len(p["chosen"][0]) + len(p["rejected"][0]) for p in train]
    run = run_epochs(model, cfg, train, lengths, micro_loss, len, guard, out, recipe.seed, "dpo", ctx, checkpoints)
    if save and ctx.is_main:
        save_tuned(model, guard, cfg, base_dir, tok, out, device)
        plot_curves(out / "metrics.jsonl", out / "loss.png", "DPO")
    return {
        "task": "dpo",
        "method": cfg.method,
        "examples": len(train),
        "dropped_too_long": too_long,
        "skipped_rows": len(splits["skipped"]),
        "beta": cfg.dpo_beta,
        **run,
        **guard.summary(),
        "base_val_reward_accuracy": round(guard.base["reward_accuracy"], 4),
        "val_reward_accuracy": round(guard.best["reward_accuracy"], 4),
        "val_reward_margin": round(guard.best["reward_margin"], 4),
        "trainable_parameters": trainable,
        "total_parameters": model.args.num_params(),
    }
