"""The fine-tuning tasks (`finetune.task`), one table entry each: the row kinds it trains on and the
function that prepares its `Training` (train/finetune_run.py); an encoder-decoder base has its own for
`generate`. A new task is a module with its `prepare_*` and a line here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lmkiln.errors import UserError
from lmkiln.model.families.family import Family
from lmkiln.train.classify import prepare_classifier
from lmkiln.train.dpo import prepare_dpo
from lmkiln.train.finetune_run import FinetuneRun, Training
from lmkiln.train.grpo import prepare_grpo
from lmkiln.train.seq2seq import prepare_seq2seq
from lmkiln.train.sft import prepare_sft
from lmkiln.train.tag import prepare_tagger

Prepare = Callable[[FinetuneRun], Training]


@dataclass(frozen=True)
class Task:
    formats: tuple[str, ...]  # the row kinds it takes (data/examples.py's formats)
    prepare: Prepare
    seq2seq: Prepare | None = None  # on an encoder-decoder base; None: the task needs another base

    def prepare_for(self, family: Family, name: str) -> Prepare:
        """The preparation for a base of this family; a base the task cannot train is a UserError."""
        if not family.is_seq2seq:
            return self.prepare
        if self.seq2seq is None:
            raise UserError(f"finetune.task={name}: a {family.name} base fine-tunes text to text (task generate)")
        return self.seq2seq


TASKS: dict[str, Task] = {
    "generate": Task(("text", "instruction", "chat"), prepare_sft, seq2seq=prepare_seq2seq),
    "dpo": Task(("preference",), prepare_dpo),
    "classify": Task(("classification",), prepare_classifier),
    "tag": Task(("tagging",), prepare_tagger),
    "grpo": Task(("instruction", "chat"), prepare_grpo),
}
