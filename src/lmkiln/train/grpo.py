"""`finetune.task: grpo`: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) on
verifiable rewards, with TRL's GRPOTrainer's objective and names.

For each prompt of a micro-batch, G completions are sampled from the policy (model/inference's batched
sampler: the prompt prefilled once, its KV cache copied into its G slots, every slot decoded together).
The rewards (eval/rewards.py) score each completion; a completion's advantage is its weighted reward
minus its group's mean, over the group's standard deviation (`scale_rewards`). The loss per token is

    -min(r * A, clip(r, 1 - epsilon, 1 + epsilon_high) * A) + beta * r * KL,   r = pi / pi_old,
    KL = exp(ref - logp) - (ref - logp) - 1   (the k3 estimator; r * KL is TRL's bias correction,
                                                kl_bias_correction: false drops the r)

averaged as `loss_type` says. One optimisation step per generation, so pi_old is the policy itself
(r = 1, its gradient A * grad log pi), as TRL does with num_iterations 1. The reference is the base:
for LoRA, the same model with its adapters off; for full fine-tuning, a frozen copy (only when beta > 0).
"""

from __future__ import annotations

import torch

from lmkiln.data.examples import prompt_text, sample
from lmkiln.errors import UserError
from lmkiln.eval.rewards import Reward, load_rewards, mean_rewards, score_all, weighted
from lmkiln.log import console
from lmkiln.model.inference.generate import sample_batch
from lmkiln.model.io.hub import load_model
from lmkiln.model.lora import adapters_off
from lmkiln.train.dist import unwrap
from lmkiln.train.epochs import load_trainable
from lmkiln.train.finetune_run import FinetuneRun, Training, save_best


def group_advantages(rewards: torch.Tensor, generations: int, scale: str) -> torch.Tensor:
    """Each completion's reward minus its group's mean, over the std (unbiased, as TRL's nanstd) of the
    group (`group`), of the whole batch (`batch`), or not divided (`none`)."""
    grouped = rewards.view(-1, generations)
    advantages = rewards - grouped.mean(1).repeat_interleave(generations)
    if scale == "none":
        return advantages
    std = grouped.std(1).repeat_interleave(generations) if scale == "group" else rewards.std().expand_as(rewards)
    return advantages / (std + 1e-4)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    epsilon: float,
    epsilon_high: float,
    loss_type: str,
    max_completion_tokens: int,
    kl_bias_correction: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss over (completions, tokens) log-probabilities under the policy, the policy that sampled
    them and the reference, with the completion mask; and its KL and clip fraction (masked means). With
    `kl_bias_correction` the KL is weighted by the ratio (its value 1 here, its gradient not)."""
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    a = advantages[:, None]
    per_token = -torch.min(ratio * a, clipped * a)
    kl = None
    if beta != 0:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        per_token = per_token + beta * (kl * ratio if kl_bias_correction else kl)
    masked = per_token * mask
    if loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    else:  # dr_grpo
        loss = masked.sum() / (per_token.size(0) * max_completion_tokens)
    with torch.no_grad():
        tokens = mask.sum().clamp(min=1.0)
        clip = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))
        stats = {
            "kl": float((kl * mask).sum() / tokens) if kl is not None else 0.0,
            "clip_fraction": float((clip * mask).sum() / tokens),
        }
    return loss, stats


def completion_logprobs(
    model, prompts: list[list[int]], completions: list[list[int]], pad: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each completion token's log-probability given its prompt and the tokens before it, at the sampling
    temperature (as TRL scores them), (N, T) padded with the mask of real tokens: one forward over prompt
    + completion, right-padded (causal, so padding never reaches a real token), the head only at the
    completion's positions."""
    device = next(unwrap(model).parameters()).device
    rows = [p + c for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    x = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    hidden = model(x, hidden_only=True)
    longest = max(1, max(len(c) for c in completions))
    index = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), longest, device=device)
    target = torch.full((len(rows), longest), pad, dtype=torch.long, device=device)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        index[i, : len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))
        mask[i, : len(c)] = 1
        target[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    picked = hidden.gather(1, index[..., None].expand(-1, -1, hidden.size(-1)))
    logits = unwrap(model).lm_head(picked).float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0], mask


class Scorer:
    """The rewards on completions: each function's value (a step is refused when one fails), their
    weighted sum, and the per-function means since the metrics last asked."""

    def __init__(self, rewards: list[Reward], tok) -> None:
        self.rewards, self.tok = rewards, tok
        self.seen: list[list[float]] = []

    def __call__(
        self, items: list[dict], completions: list[list[int]], stops: frozenset[int], per: int
    ) -> torch.Tensor:
        cases = []
        for k, ids in enumerate(completions):
            item = items[k // per]
            text = self.tok.decode([t for t in ids if t not in stops])
            cases.append((item["prompt"], text, item["row"], f"row {item['id']} (completion {k % per + 1})"))
        values = score_all(self.rewards, cases)
        self.seen += values
        return torch.tensor([weighted(self.rewards, v) for v in values])

    def means(self) -> dict[str, float]:
        if not self.seen:
            return {}
        out = mean_rewards(self.rewards, self.seen)
        self.seen = []
        return out


def encode_prompts(tok, examples: list[dict], chat, max_prompt: int) -> tuple[list[dict], int]:
    """Each example's conversation up to its last reply, with the generation prompt, as text and ids;
    prompts past `max_prompt` tokens are dropped (and counted)."""
    items, too_long = [], 0
    for ex in examples:
        prompt = prompt_text(ex, chat)
        ids = tok.encode(prompt, add_special_tokens=False).ids
        if len(ids) > max_prompt:
            too_long += 1
            continue
        items.append({"id": ex["id"], "ids": ids, "prompt": prompt, "row": ex.get("row", {})})
    return items, too_long


def reference_logprobs(model, reference, prompts, completions, pad: int, temperature: float) -> torch.Tensor:
    """The completions' log-probabilities under the base: `reference` (a frozen copy), or, when None, the
    LoRA model with its adapters off."""
    with torch.no_grad():
        if reference is not None:
            return completion_logprobs(reference, prompts, completions, pad, temperature)[0]
        with adapters_off(model):
            return completion_logprobs(model, prompts, completions, pad, temperature)[0]


def group_loss(model, net, batch: list[dict], g, scorer: Scorer, stops: frozenset[int], pad: int, reference):
    """One micro-batch of GRPO: `g.generations` completions of each prompt sampled from `model`, scored,
    their advantages, and the objective through `net` (DDP-wrapped or not); (the loss times the number
    of completions, the completion tokens, the step's figures)."""
    prompts = [item["ids"] for item in batch]
    completions = sample_batch(
        model, prompts, g.max_completion_tokens, sorted(stops), g.temperature, g.top_p,
        copies=g.generations, batch=len(batch) * g.generations, keep_stop=True,
    )  # fmt: skip
    repeated = [p for p in prompts for _ in range(g.generations)]
    advantages = group_advantages(scorer(batch, completions, stops, g.generations), g.generations, g.scale_rewards)
    logp, mask = completion_logprobs(net, repeated, completions, pad, g.temperature)
    ref = reference_logprobs(model, reference, repeated, completions, pad, g.temperature) if g.beta else None
    loss, stats = grpo_loss(
        logp, logp.detach(), ref, advantages.to(logp.device), mask, g.beta, g.epsilon,
        g.epsilon_high or g.epsilon, g.loss_type, g.max_completion_tokens, g.kl_bias_correction,
    )  # fmt: skip
    stats["completion_length"] = float(mask.sum(-1).mean())
    return loss * len(completions), int(mask.sum()), stats


def prepare_grpo(run: FinetuneRun) -> Training:
    cfg, tok, chat, device = run.cfg, run.tok, run.chat, run.device
    g = cfg.grpo
    rewards = load_rewards(cfg.rewards)
    max_prompt = cfg.max_seq_len - g.max_completion_tokens
    train, too_long = encode_prompts(tok, run.splits["train"], chat, max_prompt)
    val, _ = encode_prompts(tok, sample(run.splits["val"], cfg.max_val_examples), chat, max_prompt)
    if not train or not val:
        raise UserError(
            f"finetune.data: no training or validation prompt fits in max_seq_len={cfg.max_seq_len} "
            f"less grpo.max_completion_tokens={g.max_completion_tokens}"
        )
    console.print(
        f"GRPO prompts: train {len(train):,} ({too_long} too long dropped), val {len(val):,}; "
        f"{g.generations} completions each, rewards {', '.join(f'{r.label} x{r.weight:g}' for r in rewards)}"
    )
    model, trainable = load_trainable(run.base_dir, cfg, device)
    reference = None
    if g.beta and cfg.method != "lora":  # LoRA's reference is the same model with its adapters off
        reference = load_model(run.base_dir, device).eval().requires_grad_(False)
    stops, pad = chat.stop_ids, chat.pad
    scorer, steps = Scorer(rewards, tok), []

    def micro_loss(net, batch: list[dict]) -> tuple[torch.Tensor, int]:
        loss, tokens, stats = group_loss(model, net, batch, g, scorer, stops, pad, reference)
        steps.append(stats)
        return loss, tokens

    def extras() -> dict:
        out = scorer.means()
        if steps:
            out.update({k: round(sum(s[k] for s in steps) / len(steps), 5) for k in steps[0]})
            steps.clear()
        return out

    return Training(
        model,
        train,
        [len(item["ids"]) for item in train],
        micro_loss,
        lambda batch: len(batch) * g.generations,
        lambda: evaluate_rewards(model, val, rewards, tok, stops, g.max_completion_tokens, cfg.batch_size),
        save_best(run, model),
        trainable,
        name="grpo",
        title="GRPO",
        facts={
            "task": "grpo",
            "prompts": len(train),
            "dropped_too_long": too_long,
            "generations": g.generations,
            "rewards": [r.name for r in rewards],
            "total_parameters": model.args.num_params(),
        },
        scores=lambda guard: {
            "base_val_reward": round(guard.base["reward"], 4),
            "val_reward": round(guard.best["reward"], 4),
            "base_val_rewards": {k: v for k, v in guard.base.items() if k.startswith("reward/")},
            "val_rewards": {k: v for k, v in guard.best.items() if k.startswith("reward/")},
        },
        extras=extras,
    )


@torch.no_grad()
def evaluate_rewards(model, val: list[dict], rewards, tok, stops, max_tokens: int, batch_size: int) -> dict:
    """Validation: greedy completions of the held-out prompts, scored; the guard's loss is minus the mean
    weighted reward (higher reward, lower loss), beside each function's mean."""
    scorer = Scorer(rewards, tok)
    for i in range(0, len(val), batch_size):
        batch = val[i : i + batch_size]
        completions = sample_batch(
            model, [item["ids"] for item in batch], max_tokens, sorted(stops), temperature=0.0, batch=batch_size
        )
        scorer(batch, completions, stops, 1)
    means = scorer.means()
    return {"loss": -means["reward"], **means}
