"""metrics.jsonl: one JSON object per logged step, cut back to the resume step when a run resumes;
TensorBoard events beside it when asked."""

from __future__ import annotations

import json
from pathlib import Path

from lmkiln.errors import UserError
from lmkiln.io import write_text


class MetricsLog:
    def __init__(self, path: Path, resume_step: int = 0) -> None:
        self.path = path
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step] if resume_step else []
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


class Tracker:
    """What a training run logs: metrics.jsonl (rank 0 alone writes), and TensorBoard events when asked."""

    def __init__(self, out: Path, resume_step: int, enabled: bool, kind: str = "jsonl") -> None:
        self.log = MetricsLog(out / "metrics.jsonl", resume_step=resume_step) if enabled else None
        self.tb = None
        if enabled and kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("tracker=tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step or None)

    def __call__(self, record: dict) -> None:
        if self.log is None:
            return
        self.log.log(record)
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is gone anyway
    return out


def _panel(ax, rows: list[dict], keys: list[tuple[str, str]], ylabel: str, title: str) -> None:
    for key, label in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=label, marker="o" if key.startswith(("val_", "eval/")) else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_curves(metrics_path: Path, png: Path, title: str) -> None:
    """The training and validation loss; beside it, the in-context task scores of each validation, or
    GRPO's rewards (training, each interval; validation, each function)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmkiln.io import atomic_path

    rows = read_metrics(metrics_path)
    tasks = sorted({k for r in rows for k in r if k.startswith("eval/") and not k.endswith("acc_norm")})
    rewards = sorted({k for r in rows for k in r if k.startswith("val_reward/")})
    rewarded = any("reward" in r for r in rows)
    fig, axes = plt.subplots(
        1, 2 if tasks or rewarded else 1, figsize=(11 if tasks or rewarded else 6, 3.5), dpi=110, squeeze=False
    )
    if rewarded:  # GRPO: its validation loss is minus the reward, drawn on the right
        _panel(axes[0, 0], rows, [("loss", "train")], "GRPO loss", title)
        keys = [("reward", "train (sampled)"), ("val_reward", "validation (greedy)")]
        keys += [(k, "validation " + k.partition("/")[2]) for k in rewards if len(rewards) > 1]
        _panel(axes[0, 1], rows, keys, "reward", "rewards")
    else:
        _panel(axes[0, 0], rows, [("loss", "train"), ("val_loss", "validation")], "loss (nats/token)", title)
        if tasks:
            keys = [(k, k[len("eval/") :].replace("/", " ")) for k in tasks]
            _panel(axes[0, 1], rows, keys, "score", "in-context tasks")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
