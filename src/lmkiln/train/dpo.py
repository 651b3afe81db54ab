"""`finetune.task: dpo`: Direct Preference Optimization (Rafailov et al. 2023) on {prompt, chosen,
rejected} pairs, full or LoRA/DoRA.

    loss = -log σ(β · [(log π(chosen) - log π_ref(chosen)) - (log π(rejected) - log π_ref(rejected))])

where log π(reply) sums the log-probabilities of the reply's tokens (its end-of-turn included) given
the prompt. The reference is the base model, which the policy equals before its first step, so the
reference log-probabilities are computed once up front by the policy itself: no second model in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmkiln.data.examples import collate, encode_example, preference_pair, sample
from lmkiln.device import autocast
from lmkiln.errors import UserError
from lmkiln.log import console
from lmkiln.model.io.chat_format import ChatFormat
from lmkiln.model.loss import next_token_losses
from lmkiln.train.dist import unwrap
from lmkiln.train.epochs import load_trainable
from lmkiln.train.estimate import print_memory
from lmkiln.train.finetune_run import FinetuneRun, Training, save_best


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


def prepare_dpo(run: FinetuneRun) -> Training:
    cfg, tok, chat, device = run.cfg, run.tok, run.chat, run.device
    pad = chat.pad
    train, too_long = encode_pairs(tok, run.splits["train"], cfg.max_seq_len, chat)
    val, _ = encode_pairs(tok, sample(run.splits["val"], cfg.max_val_examples), cfg.max_seq_len, chat)
    if not train or not val:
        raise UserError(f"finetune.data: no training or validation pairs fit in max_seq_len={cfg.max_seq_len}")
    console.print(
        f"preference pairs: train {len(train):,} ({too_long} longer than {cfg.max_seq_len} tokens dropped), "
        f"val {len(val):,}; beta {cfg.dpo_beta}"
    )
    model, trainable = load_trainable(run.base_dir, cfg, device)
    longest = max(max(len(p["chosen"][0]), len(p["rejected"][0])) for p in train)
    print_memory(model, cfg, longest, pairs=2)
    add_reference(model, train + val, cfg.batch_size, pad, device)

    def micro_loss(net, batch: list[dict]) -> tuple[torch.Tensor, int]:
        loss, _ = batch_loss(net, batch, cfg.dpo_beta, pad, device)
        return loss.sum(), sum(len(p["chosen"][0]) + len(p["rejected"][0]) for p in batch)

    return Training(
        model,
        train,
        [len(p["chosen"][0]) + len(p["rejected"][0]) for p in train],
        micro_loss,
        len,
        lambda: evaluate_pairs(model, val, cfg.batch_size, cfg.dpo_beta, pad, device),
        save_best(run, model),
        trainable,
        name="dpo",
        title="DPO",
        facts={
            "task": "dpo",
            "examples": len(train),
            "dropped_too_long": too_long,
            "beta": cfg.dpo_beta,
            "total_parameters": model.args.num_params(),
        },
        scores=lambda guard: {
            "base_val_reward_accuracy": round(guard.base["reward_accuracy"], 4),
            "val_reward_accuracy": round(guard.best["reward_accuracy"], 4),
            "val_reward_margin": round(guard.best["reward_margin"], 4),
        },
        monitored=True,
    )


@torch.no_grad()
def evaluate_pairs(model, val: list[dict], batch_size: int, beta: float, pad: int, device) -> dict:
    """Validation: the mean DPO loss, how often the chosen reply wins (a tie is a coin flip), and the mean
    implicit reward margin (in log-probability units)."""
    model.eval()
    losses, margins = [], []
    for i in range(0, len(val), batch_size):
        loss, margin = batch_loss(model, val[i : i + batch_size], beta, pad, device)
        losses.append(loss)
        margins.append(margin)
    model.train()
    loss, margin = torch.cat(losses), torch.cat(margins)
    wins = (margin > 0).float() + 0.5 * (margin == 0).float()
    return {
        "loss": loss.mean().item(),
        "reward_accuracy": wins.mean().item(),
        "reward_margin": margin.mean().item() / beta,
    }
