"""Next-token losses, the one place hidden states meet the LM head and a cross-entropy: training
(pretraining, SFT, DPO), perplexity and in-context scoring all take their losses from here.

`linear_cross_entropy(h, W, t)` is the cross-entropy of a linear head without the whole logits matrix; it
equals `F.cross_entropy(h @ W.T, t, reduction="none")`, in value and gradient.

The head runs a chunk of rows at a time, and the gradient with respect to `h` (and `W`, when it
trains) is computed in the forward pass, while each chunk's logits are at hand. Peak memory for the
logits falls from about three N x V float tensors (logits, log-softmax, their gradient) to one chunk,
at no extra compute. The gradient for `h` is per row, so any upstream gradient scales it exactly. The
one for `W` sums over rows, so it is kept only when the upstream gradient is the same for every row
(a mean or sum loss, as in SFT); otherwise (DPO's per-sequence weights) it is recomputed in the
backward pass from the saved `h`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100  # the label of a position no loss is taken at: prompt, padding, an example's last token

LOGITS_PER_CHUNK = 2**24  # chunk rows x vocabulary: 64 MB of float32 logits at a time...
MIN_CHUNK_ROWS = 1024  # ...but never fewer rows: each chunk adds its V x D gradient into W's, and thin
# chunks make that pass, and the head's matrix products, the slow part


def _chunk_rows(vocab: int) -> int:
    return max(MIN_CHUNK_ROWS, LOGITS_PER_CHUNK // vocab)


def _loss_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.promote_types(h.dtype, torch.float32)  # half-precision logits are scored in float32


def _chunk_losses(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = (h @ weight.t()).to(_loss_dtype(h))
    return logits.logsumexp(-1) - logits.gather(1, target[:, None]).squeeze(1)


def _chunk_grads(
    h: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor | None = None,
    grad_h: torch.Tensor | None = None,
    grad_w: torch.Tensor | None = None,
) -> torch.Tensor:
    """Losses of one chunk. Writes d(sum of scaled losses)/dh into `grad_h` and adds d/dW to `grad_w`."""
    rows = torch.arange(len(target), device=target.device)
    probs = (h @ weight.t()).to(_loss_dtype(h))
    # one row-wise softmax pass (each row stays in cache) instead of logsumexp, subtract and exp: the loss
    # is -log p[target], exact to float rounding while p[target] is a normal float
    torch.softmax(probs, -1, out=probs)
    picked = probs[rows, target]
    loss = -picked.log()
    lost = picked < 1e-30  # softmax underflowed (a loss over ~69): score those rows from their logits
    if bool(lost.any()):
        loss[lost] = _chunk_losses(h[lost], weight, target[lost])
    probs[rows, target] = picked - 1
    if scale is not None:
        probs *= scale[:, None]
    probs = probs.to(h.dtype)
    if grad_h is not None:
        torch.mm(probs, weight, out=grad_h)
    if grad_w is not None:
        if grad_w.dtype == h.dtype:
            grad_w.addmm_(probs.t(), h)
        else:
            grad_w += probs.t() @ h
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = _chunk_rows(weight.shape[0])
        losses = torch.empty(len(target), dtype=_loss_dtype(hidden), device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=_loss_dtype(weight), device=weight.device) if want_w else None
        for s in range(0, len(target), rows):
            losses[s : s + rows] = _chunk_grads(
                hidden[s : s + rows],
                weight,
                target[s : s + rows],
                None,
                grad_h[s : s + rows] if want_h else None,
                grad_w,
            )
        ctx.save_for_backward(hidden, weight, target, grad_h, grad_w)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, target, grad_h, grad_w = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        uniform = bool((grad_losses == grad_losses[0]).all()) if len(grad_losses) else True
        if want_w and not uniform:  # per-row weights: W's gradient must be summed again, scaled
            rows = _chunk_rows(weight.shape[0])
            grad_w = torch.zeros(weight.shape, dtype=_loss_dtype(weight), device=weight.device)
            for s in range(0, len(target), rows):
                _chunk_grads(
                    hidden[s : s + rows], weight, target[s : s + rows], grad_losses[s : s + rows], None, grad_w
                )
        elif want_w:
            grad_w = grad_w * grad_losses[0]
        gh = (grad_h * grad_losses[:, None].to(grad_h.dtype)) if want_h else None
        return gh, grad_w.to(weight.dtype) if want_w else None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy of `hidden @ weight.T` (N x V logits, never held whole) against `target`."""
    if hidden.device.type != "cpu" and torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, target)
    rows = _chunk_rows(weight.shape[0])
    return (
        torch.cat(
            [_chunk_losses(hidden[s : s + rows], weight, target[s : s + rows]) for s in range(0, len(target), rows)]
        )
        if len(target)
        else hidden.new_zeros(0)
    )


INFERENCE_CHUNK_ROWS = 256  # no gradient to fuse: small chunks keep each block of logits in cache


def lm_head(model: nn.Module) -> torch.Tensor | nn.Module:
    """What the losses below take as a model's head: its weight, or the module itself where the head
    has no plain weight (a quantized one)."""
    return getattr(model.lm_head, "weight", model.lm_head)


@torch.no_grad()
def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor | nn.Module,
    target: torch.Tensor,
    greedy: bool = False,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) of each row of `hidden @ weight.T` in float32, a chunk of rows at a time (the logits
    are never whole), and, with `greedy`, whether the target is that row's most likely token. With
    `rows`, target i is scored at hidden row rows[i] (sorted): a row several targets share (the context
    every choice continues) runs through the head once."""
    rows = torch.arange(len(target), device=target.device) if rows is None else rows
    logp = torch.empty(len(target), dtype=_loss_dtype(hidden), device=hidden.device)
    best = torch.empty(len(target), dtype=torch.bool, device=hidden.device) if greedy else None
    bounds = torch.searchsorted(
        rows, torch.arange(0, len(hidden) + INFERENCE_CHUNK_ROWS, INFERENCE_CHUNK_ROWS, device=rows.device)
    ).tolist()
    for k, s in enumerate(range(0, len(hidden), INFERENCE_CHUNK_ROWS)):
        a, b = bounds[k], bounds[k + 1]
        chunk = hidden[s : s + INFERENCE_CHUNK_ROWS]
        logits = (weight(chunk) if isinstance(weight, nn.Module) else chunk @ weight.t()).to(logp.dtype)
        local, t = rows[a:b] - s, target[a:b]
        logp[a:b] = logits[local, t] - logits.logsumexp(-1)[local]
        if best is not None:
            best[a:b] = logits.argmax(-1)[local] == t
    return logp, best


def next_token_losses(
    forward,
    x: torch.Tensor,
    y: torch.Tensor,
    head: torch.Tensor | nn.Module | None,
    segments: torch.Tensor | None = None,
    dense: bool = False,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The cross-entropy of each labelled token (y != IGNORE) and the row it is in. `forward` runs
    the model (maybe DDP-wrapped or compiled). With the LM head's weight `head` (and `bias`, for a head
    that has one, as an encoder's decoder does), the head runs inside the loss on the labelled positions
    alone, a chunk at a time (a head module, such as a quantized one, too): prompts, padding and
    unmasked tokens never become logits, and the tokens x vocabulary logits are never whole. `head=None` lets the model run its own head, for FSDP, where the
    head's weight is whole only inside the model's forward. `dense` says every position is labelled
    (pretraining windows): no selection, and no rows (None). A decoder's caller shifts y by one (the next
    token); an encoder's labels stand at the masked positions themselves."""
    kwargs = {"segments": segments} if segments is not None else {}
    labelled = None if dense else (y != IGNORE)
    if head is None:
        out = forward(x, **kwargs)
        out, y = (out.flatten(0, 1), y.flatten()) if dense else (out[labelled], y[labelled])
        losses = F.cross_entropy(out.float(), y, reduction="none")
    else:
        out = forward(x, hidden_only=True, **kwargs)
        out, y = (out.flatten(0, 1), y.flatten()) if dense else (out[labelled], y[labelled])
        if isinstance(head, nn.Module):  # a head that is no plain weight (a quantized one): no gradient
            losses = -token_logprobs(out, head, y)[0]
            return losses, None if dense else labelled.nonzero(as_tuple=True)[0]
        if bias is not None:  # the bias as one more input column: h @ W.T + b = [h, 1] @ [W, b].T
            out = torch.cat([out, out.new_ones(len(out), 1)], dim=1)
            head = torch.cat([head, bias[:, None].to(head.dtype)], dim=1)
        losses = linear_cross_entropy(out, head, y)
    return losses, None if dense else labelled.nonzero(as_tuple=True)[0]
