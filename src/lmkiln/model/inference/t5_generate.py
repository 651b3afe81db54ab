"""Decoding for the encoder-decoder: greedy, sampling and beam search. The input is encoded once; the
decoder runs on every hypothesis' tokens so far (the start token first).

Beam search follows transformers' `generate(num_beams=N)`, so both give the same output on the same
model and settings: each step takes the top 2N continuations of the running beams by summed
log-probability; of those, the top N that end (EOS, or the length limit) become finished hypotheses,
scored by the summed log-probability over (generated tokens ** length_penalty), and the best N that do
not end run on. The search stops when no running beam can beat the worst of N finished ones (with
`early_stopping`, as soon as N have finished), or at the length limit."""

from __future__ import annotations

from pathlib import Path

import torch

from lmkiln.model.families.t5 import T5

NEG = -1.0e9  # transformers' "impossible" score


@torch.no_grad()
def _next_logprobs(model: T5, memory: torch.Tensor, mask: torch.Tensor, prefixes: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next token after each decoder prefix (rows share one encoded input)."""
    n = len(prefixes)
    states = model.decode(prefixes, memory.expand(n, -1, -1), mask.expand(n, -1))
    return torch.log_softmax(model.lm_head(model.head_input(states[:, -1])).float(), dim=-1)


@torch.no_grad()
def generate(
    model: T5,
    input_ids: list[int],
    max_new_tokens: int,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The generated ids for one input (without the start token; EOS kept when produced). num_beams > 1:
    beam search; else greedy at temperature 0, or sampling (top-p) above it."""
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    memory = model.encode(ids, mask)
    start, eos = model.args.decoder_start_token_id, model.args.eos_token_id
    if num_beams > 1:
        return _beam_search(model, memory, mask, start, eos, max_new_tokens, num_beams, length_penalty, early_stopping)
    out = [start]
    for _ in range(max_new_tokens):
        logp = _next_logprobs(model, memory, mask, torch.tensor([out], device=device))[0]
        if temperature <= 0:
            token = int(logp.argmax())
        else:
            probs = torch.softmax(logp / temperature, -1)
            if top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            token = int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
        out.append(token)
        if token == eos:
            break
    return out[1:]


def _beam_search(
    model: T5,
    memory: torch.Tensor,
    mask: torch.Tensor,
    start: int,
    eos: int,
    max_new_tokens: int,
    beams: int,
    length_penalty: float,
    early_stopping: bool,
) -> list[int]:
    device = memory.device
    running = [[start] for _ in range(beams)]
    scores = torch.tensor([0.0] + [NEG] * (beams - 1), device=device)  # only the first beam expands at first
    finished: list[tuple[float, list[int]]] = []  # (normalised score, tokens), best first, at most `beams`
    improvable = True
    for step in range(1, max_new_tokens + 1):
        logp = _next_logprobs(model, memory, mask, torch.tensor(running, device=device)) + scores[:, None]
        vocab = logp.shape[-1]
        top, index = logp.flatten().topk(2 * beams)
        candidates = [(float(s), running[int(i) // vocab] + [int(i) % vocab]) for s, i in zip(top, index)]
        ends = [seq[-1] == eos or step == max_new_tokens for _, seq in candidates]
        # the top `beams` candidates that end are finished hypotheses, unless no improvement is possible
        # any more or (early stopping) every slot is already taken
        full = early_stopping and len(finished) == beams
        if improvable and not full:
            for (score, seq), end in zip(candidates[:beams], ends[:beams]):
                if end:
                    finished.append((score / step**length_penalty, seq))
            finished = sorted(finished, key=lambda f: -f[0])[:beams]
        alive = [(s, seq) for (s, seq), end in zip(candidates, ends) if not end][:beams]
        if not alive or all(ends):
            break
        while len(alive) < beams:  # transformers keeps N rows; impossible ones never win
            alive.append((NEG, alive[-1][1]))
        running = [seq for _, seq in alive]
        scores = torch.tensor([s for s, _ in alive], device=device)
        if len(finished) == beams:
            best_possible = alive[0][0] / step**length_penalty
            improvable = improvable and best_possible > finished[-1][0]
        if not improvable or (early_stopping and len(finished) == beams):
            break
    if not finished:
        return running[0][1:]
    return finished[0][1][1:]


def input_ids(tok, text: str, eos: int) -> list[int]:
    """An encoder-decoder's input: the text's ids ending with EOS (a T5 tokenizer adds it itself)."""
    ids = tok.encode(text).ids
    return ids if ids and ids[-1] == eos else ids + [eos]


def print_output(
    model_dir: Path, text: str, max_tokens: int, num_beams: int, length_penalty: float, sampling: dict, device, out
) -> None:
    """`kiln generate` on an encoder-decoder: the output for `text`, decoded without special tokens."""
    from lmkiln.model.inference.load import load_format
    from lmkiln.model.io.hub import load_model

    tok, _ = load_format(model_dir)
    model = load_model(model_dir, device).eval()
    ids = input_ids(tok, text, model.args.eos_token_id)
    if len(ids) > model.args.max_seq_len:
        ids = ids[: model.args.max_seq_len - 1] + [model.args.eos_token_id]
    generated = generate(model, ids, max_tokens, num_beams, length_penalty, **sampling)
    out.write(tok.decode(generated, skip_special_tokens=True) + "\n")
