"""lmkiln's ICL scoring against lm-evaluation-harness on the same documents: COPA, PIQA, ARC-Easy and
LAMBADA from ../shared/data/icl-eval, zero-shot, one model, in one run.

The harness reads the same JSONL files through local task YAMLs written here (`dataset_path: json`;
multiple_choice with `doc_to_text: {{query}}`, `doc_to_choice: {{choices}}`, `doc_to_target: {{gold}}`;
LAMBADA as `loglikelihood` of `" " + continuation`, scored by acc and perplexity), with its HF model class on the CPU in float32, and
no BOS (its default, and lmkiln's `eval.add_bos: false`). lmkiln scores the same first `--limit`
documents of each file with `kiln eval`'s code. Printed per task: acc and acc_norm on both sides, the
largest difference in points (goal: within 0.5), and the seconds each took.

    python bench/eval_vs_lmeval.py [--model runs/quickstart/pretrain/final] [--limit 500] [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "icl-eval"
TASKS = {
    "copa": "multiple_choice",
    "piqa": "multiple_choice",
    "arc_easy": "multiple_choice",
    "lambada_openai": "language_modeling",
}

MC_YAML = """task: kiln_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

LM_YAML = """task: kiln_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + continuation}}}}"
metric_list:
  - metric: acc
  - metric: perplexity
"""


def run_lmkiln(model_dir: Path, limit: int, batch: int) -> tuple[dict, float]:
    from lmkiln.eval.icl import IclTask, evaluate_task
    from lmkiln.model.inference.load import load_for_inference

    lm = load_for_inference(model_dir, "cpu")
    t0 = time.perf_counter()
    out = {
        name: evaluate_task(
            lm.model, lm.tok, lm.chat, IclTask(name, str(DATA / f"{name}.jsonl"), max_examples=limit), batch_size=batch
        )
        for name in TASKS
    }
    return out, time.perf_counter() - t0


def run_harness(model_dir: Path, limit: int, batch: int) -> tuple[dict, float]:
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tasks_dir:
        for name, kind in TASKS.items():
            text = (MC_YAML if kind == "multiple_choice" else LM_YAML).format(name=name, path=DATA / f"{name}.jsonl")
            Path(tasks_dir, f"{name}.yaml").write_text(text)
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={model_dir},dtype=float32",
            tasks=[f"kiln_{n}" for n in TASKS],
            device="cpu",
            batch_size=batch,
            limit=limit,
            task_manager=TaskManager(include_path=tasks_dir),
            bootstrap_iters=0,
        )
        seconds = time.perf_counter() - t0
    metrics = ("acc", "acc_norm", "perplexity")
    return {n: {m: res["results"][f"kiln_{n}"].get(f"{m},none") for m in metrics} for n in TASKS}, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        type=Path,
        default=Path("runs/quickstart/pretrain/final"),
        help="an lmkiln model directory (default: the quickstart's pretrained model)",
    )
    p.add_argument("--limit", type=int, default=500, help="first N documents of each task")
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"no model at {args.model}: run `kiln run recipes/quickstart.yaml` or pass --model")
    ours, t_ours = run_lmkiln(args.model, args.limit, args.batch)
    theirs, t_theirs = run_harness(args.model, args.limit, args.batch)
    print(f"model {args.model}, first {args.limit} documents per task, zero-shot, CPU float32")
    print(
        f"{'task':16}{'n':>6}{'acc lmkiln':>12}{'acc harness':>13}{'norm lmkiln':>13}{'norm harness':>14}{'max diff':>10}"
    )
    worst = 0.0
    for name in TASKS:
        o, t = ours[name], theirs[name]
        diffs = [abs(o[m] - t[m]) * 100 for m in ("acc", "acc_norm") if t[m] is not None]
        worst = max([worst, *diffs])
        norm_t = f"{t['acc_norm']:.4f}" if t["acc_norm"] is not None else "-"
        norm_o = f"{o['acc_norm']:.4f}" if TASKS[name] != "language_modeling" else "-"
        print(f"{name:16}{o['n']:>6}{o['acc']:>12.4f}{t['acc']:>13.4f}{norm_o:>13}{norm_t:>14}{max(diffs):>9.2f}pt")
    lm = [n for n, k in TASKS.items() if k == "language_modeling"]
    for name in lm:
        o, t = ours[name]["perplexity"], theirs[name]["perplexity"]
        print(f"{name} perplexity: lmkiln {o:,.4f}, harness {t:,.4f} (relative difference {abs(o - t) / t:.1e})")
    print(f"seconds: lmkiln {t_ours:.1f}, harness {t_theirs:.1f}, speed ratio {t_theirs / t_ours:.2f}")
    print(f"agreement: largest difference {worst:.2f} points ({'within' if worst <= 0.5 else 'OUTSIDE'} 0.5)")


if __name__ == "__main__":
    main()
