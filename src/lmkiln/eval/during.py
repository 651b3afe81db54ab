"""In-context tasks scored while a model trains: the scoring `kiln eval` does, on the first N documents
of each task, at every validation of pretrain and finetune. Scores go to metrics.jsonl (and
TensorBoard) as `eval/TASK/METRIC`, and to the curves."""

from __future__ import annotations

import dataclasses

import torch

from lmkiln.eval.icl import core_average, evaluate_task, load_docs


class TaskMonitor:
    def __init__(self, refs: list[str], recipe, max_examples: int) -> None:
        from lmkiln.eval.stage import icl_tasks

        cfg = recipe.eval.model_copy(update={"tasks": refs})
        self.tasks = [
            dataclasses.replace(t, max_examples=min(t.max_examples or max_examples, max_examples))
            for t in icl_tasks(cfg)
        ]
        # read once, here: a malformed line stops the run before any training, and validations reuse them
        self.loaded = [load_docs(task.path, task.kind) for task in self.tasks]
        self.seed, self.add_bos = cfg.seed, cfg.add_bos

    def __call__(self, model: torch.nn.Module, tok, chat) -> dict[str, float]:
        """Flat scores of the model as it is now, with its tokenizer and format (ChatFormat); it is left in
        the mode it was in."""
        training = model.training
        with torch.no_grad():
            results = {
                t.name: evaluate_task(model, tok, chat, t, self.seed, self.add_bos, loaded=docs)
                for t, docs in zip(self.tasks, self.loaded)
            }
        model.train(training)
        return flat_scores(results)


def flat_scores(results: dict) -> dict[str, float]:
    out = {}
    for name, r in results.items():
        if r["kind"] == "bias":
            out[f"eval/{name}/pct_stereotype"] = r["pct_stereotype"]
            continue
        out[f"eval/{name}/acc"] = r["acc"]
        if r["kind"] != "language_modeling":
            out[f"eval/{name}/acc_norm"] = r["acc_norm"]
    core = core_average(results)
    if core is not None:
        out["eval/icl/centered"] = core
    return out


def describe(scores: dict[str, float]) -> str:
    """`copa acc 0.5400, piqa acc 0.5100` for the console."""
    return ", ".join(
        f"{key[len('eval/') :].replace('/', ' ')} {value:.4f}"
        for key, value in scores.items()
        if not key.endswith("acc_norm")
    )
