"""What `kiln data` kept and removed, and why: counts of documents and bytes per reason, overall and per
source, printed as a table, saved in stats.json and drawn in removals.png."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from lmkiln.io import atomic_path
from lmkiln.log import console


class Tally:
    """Documents and bytes in, removed per reason, and kept per split, overall and per source."""

    def __init__(self, reasons: list[str]) -> None:
        self.total: Counter = Counter()
        self.removed: dict[str, Counter] = {r: Counter() for r in reasons}
        self.sources: dict[str, Counter] = defaultdict(Counter)

    def add_in(self, origin: str, size: int) -> None:
        for c in (self.total, self.sources[origin]):
            c.update(docs_in=1, bytes_in=size)

    def add_removed(self, origin: str, reason: str, size: int) -> None:
        self.removed.setdefault(reason, Counter()).update(docs=1, bytes=size)
        self.sources[origin].update({f"removed:{reason}": 1, f"removed_bytes:{reason}": size})

    def add_kept(self, origin: str, split: str, size: int) -> None:
        self.total.update({f"{split}_docs": 1, f"{split}_bytes": size})
        self.sources[origin].update(docs_out=1, bytes_out=size)

    def result(self) -> dict:
        t = self.total
        out = {k: t[k] for k in ("docs_in", "bytes_in", "train_docs", "val_docs", "train_bytes", "val_bytes")}
        out["docs_out"] = t["train_docs"] + t["val_docs"]
        out["bytes_out"] = t["train_bytes"] + t["val_bytes"]
        out["removed"] = {r: {"docs": c["docs"], "bytes": c["bytes"]} for r, c in self.removed.items()}
        out["per_source"] = {
            origin: {
                "docs_in": c["docs_in"],
                "bytes_in": c["bytes_in"],
                "docs_out": c["docs_out"],
                "bytes_out": c["bytes_out"],
                "removed": {k.split(":", 1)[1]: v for k, v in sorted(c.items()) if k.startswith("removed:")},
                "removed_bytes": {
                    k.split(":", 1)[1]: v for k, v in sorted(c.items()) if k.startswith("removed_bytes:")
                },
            }
            for origin, c in self.sources.items()
        }
        return out


def print_stats(stats: dict) -> None:
    from rich.table import Table

    table = Table(title="data", show_edge=False)
    for col in ("", "documents", "bytes"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("in", f"{stats['docs_in']:,}", f"{stats['bytes_in']:,}")
    for reason, r in stats["removed"].items():
        table.add_row(f"removed: {reason}", f"{r['docs']:,}", f"{r['bytes']:,}")
    table.add_row("out (train)", f"{stats['train_docs']:,}", f"{stats['train_bytes']:,}")
    table.add_row("out (val)", f"{stats['val_docs']:,}", f"{stats['val_bytes']:,}")
    for kind, n in stats.get("pii_redacted", {}).items():
        table.add_row(f"redacted: {kind}", f"{n:,}", "")
    console.print(table)
    if len(stats.get("per_source", {})) > 1:
        per = Table(title="per source", show_edge=False)
        for col in ("source", "in", "kept", "removed (most common reasons)"):
            per.add_column(col, justify="left" if col in ("source", "removed (most common reasons)") else "right")
        for origin, s in stats["per_source"].items():
            top = sorted(s["removed"].items(), key=lambda kv: -kv[1])[:3]
            per.add_row(origin, f"{s['docs_in']:,}", f"{s['docs_out']:,}", ", ".join(f"{r} {n:,}" for r, n in top))
        console.print(per)


def load_pyplot():
    """matplotlib's pyplot on the file-only backend (no display is ever needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_removals(stats: dict, png: Path) -> None:
    """Documents and bytes kept and removed per reason, each bar split by source."""
    plt = load_pyplot()

    reasons = ["kept"] + [r for r, v in stats["removed"].items() if v["docs"]]
    sources = list(stats["per_source"]) or ["all"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(reasons) + 1.6), dpi=110, sharey=True)
    for ax, unit in zip(axes, ("docs", "bytes")):
        totals = [stats["docs_out" if unit == "docs" else "bytes_out"]] + [
            stats["removed"][r][unit] for r in reasons[1:]
        ]
        left = [0.0] * len(reasons)
        for k, origin in enumerate(sources):
            s = stats["per_source"].get(origin)
            if s is None:  # nothing came in
                counts = totals
            else:
                removed = s["removed"] if unit == "docs" else s["removed_bytes"]
                counts = [s[f"{unit}_out"]] + [removed.get(r, 0) for r in reasons[1:]]
            ax.barh(
                reasons[::-1],
                counts[::-1],
                left=left[::-1],
                label=origin if len(sources) > 1 else None,
                color=plt.cm.tab10(k % 10),
            )
            left = [a + b for a, b in zip(left, counts)]
        for i, n in enumerate(totals[::-1]):
            ax.text(n, i, f" {n:,}", va="center", fontsize=8)
        ax.set_xlabel(unit)
    axes[0].set_title(f"data: {stats['docs_in']:,} documents in")
    axes[1].set_title(f"{stats['bytes_in']:,} bytes in")
    if len(sources) > 1:
        axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
