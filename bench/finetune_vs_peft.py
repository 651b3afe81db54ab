"""LoRA fine-tuning speed and memory: lmkiln against transformers + PEFT (a plain training loop), on the
same model, data, batches and rank, in one run.

Model: SmolLM2-135M's shape (30 layers, hidden 576, 9 heads and 3 KV heads, MLP 1536, vocabulary
49,152, tied embeddings), randomly initialised and saved once by lmkiln, so both sides load the same
weights (this machine has no network for the real ones; speed and memory depend on the shape only).
Data: `--steps` x `--batch` Bitext customer-support instruction -> response pairs from ../shared/data
(a seeded sample), rendered with the chat template and encoded with a byte-level BPE trained on the same
file; loss on the replies only. Both sides train one pass over exactly these examples, batch by batch,
each batching them as it does by default: lmkiln in length-grouped batches (`kiln finetune`), the peer
in shuffled batches padded to the longest (the Trainer's default sampler and padding collator). With
`--same-batches` both get lmkiln's batches, so the work is identical and only the implementations differ.
Each side runs in a fresh process: LoRA r=16, alpha 32 on all seven projections, AdamW, fp32 on the CPU,
one untimed warmup step, then the timed pass. Printed: tokens/s (the examples' tokens, padding not
counted, over the pass's wall time), peak resident memory above the process's own baseline taken after
loading the model (sampled every 2 ms), the last step's loss, and the ratios.

transformers gets its fastest correct setting: no attention mask (right padding under a causal mask
never reaches a real token, and padded labels are -100), SDPA attention, `labels` for the loss.

    python bench/finetune_vs_peft.py [--steps 8] [--batch 8] [--rank 16] [--same-batches]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DATA = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "bitext-customer-support"
    / "Bitext_Sample_Customer_Support_Training_Dataset.csv"
)
SHAPE = dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536, vocab_size=49152)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """The highest resident memory seen while the block runs, sampled every 2 ms."""

    def __enter__(self):
        self.base, self.peak, self._stop = rss_mb(), rss_mb(), False
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def prepare(work: Path, batch: int, steps: int, max_len: int) -> None:
    """The shared model directory and training examples (token ids and labels) both sides use."""
    import torch

    from lmkiln.data.examples import encode_example
    from lmkiln.model.families.transformer import ModelArgs, Transformer
    from lmkiln.model.io.chat_format import ChatFormat
    from lmkiln.model.io.hub import save_model
    from lmkiln.tokenizer.train import save_tokenizer, train_bpe

    with open(DATA, newline="") as fh:
        rows = list(csv.DictReader(fh))
    tok = train_bpe((r["instruction"] + "\n" + r["response"] for r in rows), 8192)
    chat = ChatFormat()
    encoded = []
    for r in random.Random(0).sample(rows, len(rows)):
        ids, labels = encode_example(tok, {"instruction": r["instruction"], "output": r["response"]}, chat)
        if len(ids) <= max_len:
            encoded.append((ids, labels))
        if len(encoded) == batch * steps:
            break
    (work / "examples.json").write_text(json.dumps(encoded))
    args = ModelArgs(
        max_seq_len=2048,
        tie_embeddings=True,
        bos_token_id=tok.token_to_id("<|bos|>"),
        eos_token_id=tok.token_to_id("<|eos|>"),
        pad_token_id=tok.token_to_id("<|pad|>"),
        **SHAPE,
    )
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights(torch.Generator().manual_seed(0))
    save_tokenizer(tok, work / "model")
    save_model(model, work / "model")


def batches_of(examples: list, batch: int, grouped: bool) -> list[list]:
    from lmkiln.train.epochs import length_grouped_batches

    rng = random.Random(0)
    if grouped:
        order = length_grouped_batches([len(ids) for ids, _ in examples], batch, rng)
    else:
        idx = list(range(len(examples)))
        rng.shuffle(idx)
        order = [idx[i : i + batch] for i in range(0, len(idx), batch)]
    return [[examples[i] for i in b] for b in order]


def padded(batch: list, pad: int):
    import torch

    width = max(len(ids) for ids, _ in batch)
    x = torch.full((len(batch), width), pad, dtype=torch.long)
    y = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (ids, labels) in enumerate(batch):
        x[i, : len(ids)], y[i, : len(labels)] = torch.tensor(ids), torch.tensor(labels)
    return x, y


def run_ours(model_dir: Path, rank: int, device: str):
    """lmkiln's own pieces, as `kiln finetune finetune.method=lora` uses them."""
    from types import SimpleNamespace

    from lmkiln.eval.generative import batch_loss
    from lmkiln.model.io.hub import load_model
    from lmkiln.train.epochs import make_trainable
    from lmkiln.train.optim import adamw

    model = load_model(model_dir, device)
    lora = SimpleNamespace(r=rank, alpha=2.0 * rank, dropout=0.0, targets=TARGETS, dora=False)
    make_trainable(model, SimpleNamespace(method="lora", lora=lora, gradient_checkpointing=False))
    model.to(device).train()
    opt = adamw(model, 1e-4, 0.0)

    def step(batch):
        loss, n, tokens = batch_loss(model, batch, 0, model.lm_head.weight.device)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return (loss / n).item(), tokens

    return step


def run_peft(model_dir: Path, rank: int, device: str):
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    model = model.to(device)
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

    def step(batch):
        x, y = padded(batch, 0)
        # transformers shifts the labels itself: give it the inputs' own token at each trained position
        labels = torch.full_like(y, -100)
        labels[:, 1:] = y[:, :-1]
        loss = model(input_ids=x.to(device), labels=labels.to(device)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item(), x.numel()

    return step


class PeakCuda:
    """The CUDA allocator's peak above what it held on entry (the model's weights), in MB."""

    def __enter__(self):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated() / 2**20
        return self

    def __exit__(self, *exc) -> None:
        import torch

        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated() / 2**20


def side(args) -> None:
    import torch

    torch.manual_seed(0)
    work = Path(args.work)
    examples = json.loads((work / "examples.json").read_text())
    batches = batches_of(examples, args.batch, grouped=args.side == "lmkiln" or args.same_batches)
    step = (run_ours if args.side == "lmkiln" else run_peft)(work / "model", args.rank, args.device)
    with PeakRSS() if args.device == "cpu" else PeakCuda() as mem:
        step(batches[0])  # warmup: first-call allocations and kernel choices, untimed
        t0 = time.perf_counter()
        for batch in batches:
            loss, padded_tokens = step(batch)
        seconds = time.perf_counter() - t0
    tokens = sum(len(ids) for ids, _ in examples)
    print(
        json.dumps(
            {
                "tokens_per_s": tokens / seconds,
                "peak_mb": mem.peak - mem.base,
                "loss": loss,
                "seconds": seconds,
                "tokens": tokens,
                "padded": sum(len(b) * max(len(i) for i, _ in b) for b in batches),
            }
        )
    )


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="batches in the timed pass")
    p.add_argument("--batch", type=int, default=8, help="examples per batch")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--max-len", type=int, default=384, help="longest example kept, in tokens")
    p.add_argument("--same-batches", action="store_true", help="both sides train lmkiln's batches (equal work)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (peak memory is then the CUDA allocator's)")
    p.add_argument("--side", choices=("lmkiln", "peft"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return side(args)
    with tempfile.TemporaryDirectory() as work:
        prepare(Path(work), args.batch, args.steps, args.max_len)
        results = {}
        for name in ("lmkiln", "peft"):
            cmd = [
                sys.executable,
                __file__,
                "--side",
                name,
                "--work",
                work,
                f"--batch={args.batch}",
                f"--rank={args.rank}",
                f"--device={args.device}",
            ] + (["--same-batches"] if args.same_batches else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[name] = json.loads(out.strip().splitlines()[-1])
    ours, peer = results["lmkiln"], results["peft"]
    batching = "the same batches" if args.same_batches else "each side's default batching"
    print(
        f"LoRA r={args.rank} on a SmolLM2-135M-shaped model: {args.steps} steps of {args.batch} examples, "
        f"{ours['tokens']:,} tokens, {batching}, "
        + (f"CPU fp32, {torch_threads()} threads" if args.device == "cpu" else f"{args.device} fp32")
    )
    print(f"{'':24}{'tokens/s':>10}{'peak MB':>10}{'padded tokens':>15}{'last loss':>11}")
    for name, label in (("lmkiln", "lmkiln"), ("peft", "transformers + PEFT")):
        r = results[name]
        print(f"{label:24}{r['tokens_per_s']:>10.1f}{r['peak_mb']:>10.0f}{r['padded']:>15,}{r['loss']:>11.4f}")
    print(
        f"speed ratio (lmkiln / PEFT): {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}   "
        f"memory ratio (lmkiln / PEFT): {ours['peak_mb'] / peer['peak_mb']:.2f}"
    )


if __name__ == "__main__":
    main()
