"""The bad-input matrix: every verb against every class of user mistake. Each must exit 2 with one line
on stderr (no traceback), write nothing, and leave every file as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest

from lmkiln.cli import main
from tests.conftest import TINY, write_instructions

BAD_UTF8 = b"a line that is fine\nand one cut in the middle of a character: " + b"\xe2\x82"


@pytest.fixture(scope="module")
def ws(trained_run, tmp_path_factory):
    """A workspace: a model, a user's folder, and data files with every kind of fault."""
    _, run_dir, _ = trained_run
    root = tmp_path_factory.mktemp("ws")
    shutil.copytree(run_dir / "pretrain" / "final", root / "model")
    (root / "mine").mkdir()
    (root / "mine" / "NOTES.txt").write_text("the user's own notes\n")
    (root / "empty.txt").write_text("")
    (root / "cut.txt").write_bytes(BAD_UTF8)
    (root / "cut.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "' + b"\xe2\x82" + b'"}\n')
    (root / "cut.csv").write_bytes(b"instruction,output\nok,fine\nbad," + b"\xff" + b"\n")
    (root / "task.jsonl").write_bytes(b'{"query": "q", "choices": ["a", "b"], "gold": 0}\n' + b"\xc3(\n")
    (root / "recipe.yaml").write_bytes(b"seed: 1\n# caf\xe9 in latin-1\n")
    two = root / "two.jsonl"
    two.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(2)))
    write_instructions(root / "sft.jsonl")
    (root / "models.yaml").write_text(f"modle: {root / 'model'}\n")  # a misspelt key
    qa = {"metric": "token_f1", "score": 0.5, "samples": [0.5], "failed_requests": 0, "answered_by": []}
    run = {"time": 1.0, "url": "http://127.0.0.1:9/v1", "tasks": {"qa": qa}}
    (root / "history.jsonl").write_text(json.dumps(run) + "\n")
    # a run whose tokenizer stage finished with an empty training shard
    shutil.copytree(run_dir / "data", root / "emptyrun" / "data")
    shutil.copytree(run_dir / "tokenizer", root / "emptyrun" / "tokenizer")
    (root / "emptyrun" / "tokenizer" / "train.bin").write_bytes(b"")
    header = json.loads((root / "emptyrun" / "tokenizer" / "train.json").read_text())
    (root / "emptyrun" / "tokenizer" / "train.json").write_text(json.dumps({**header, "num_tokens": 0}))
    return root


def snapshot(root: Path) -> dict:
    """Every file and folder under root with its content hash and modification time."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = ("dir",) if p.is_dir() else (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def busy_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


# (case, verb, arguments with {ws} for the workspace, what the one line must say). Every verb appears.
CASES = [
    # outputs that would destroy something
    ("import-onto-itself", "import", ["{ws}/model", "{ws}/model"], "is the input"),
    ("import-inside-its-source", "import", ["{ws}/model", "{ws}/model/inside"], "is the input"),
    (
        "import-over-a-users-folder",
        "import",
        ["{ws}/model", "{ws}/mine"],
        "holds files lmkiln did not write (NOTES.txt)",
    ),
    ("export-onto-itself", "export", ["{ws}/model", "{ws}/model"], "is the input"),
    ("quantize-onto-itself", "quantize", ["{ws}/model", "{ws}/model", "--quant", "int8"], "is the input"),
    (
        "quantize-over-a-users-folder",
        "quantize",
        ["{ws}/model", "{ws}/mine", "--quant", "int8"],
        "holds files lmkiln did not write (NOTES.txt)",
    ),
    ("quantize-no-model", "quantize", ["{ws}/mine", "{ws}/out", "--quant", "int8"], "is not a model directory"),
    (
        "export-over-a-users-folder",
        "export",
        ["{ws}/model", "{ws}/mine"],
        "holds files lmkiln did not write (NOTES.txt)",
    ),
    (
        "eval-out-over-a-users-folder",
        "eval",
        ["--models", "{ws}/model", "--tasks", "builtin:bias", "--out", "{ws}/mine"],
        "holds files lmkiln did not write",
    ),
    (
        "eval-out-onto-its-model",
        "eval",
        ["--models", "{ws}/model", "--tasks", "builtin:bias", "--out", "{ws}/model"],
        "is the input",
    ),
    # models that are not there: every one checked before the first is used
    (
        "eval-second-model-missing",
        "eval",
        ["--models", "{ws}/model", "{ws}/nope", "--tasks", "builtin:bias"],
        "'{ws}/nope' is neither a stage name nor a model directory",
    ),
    ("generate-no-model", "generate", ["{ws}/nope", "--prompt", "hi"], "is not a model directory"),
    ("chat-no-model", "chat", ["{ws}/nope"], "is not a model directory"),
    ("serve-no-model", "serve", ["{ws}/nope"], "is not a model directory"),
    ("monitor-no-task-file", "monitor", ["http://127.0.0.1:9/v1", "--tasks", "gen:{ws}/nope.jsonl"], "does not exist"),
    (
        "monitor-baseline-not-eval-json",
        "monitor",
        ["http://127.0.0.1:9/v1", "--tasks", "gen:{ws}/two.jsonl", "--baseline", "{ws}/sft.jsonl"],
        "not an eval.json",
    ),
    (
        "monitor-zero-concurrency",
        "monitor",
        ["http://127.0.0.1:9/v1", "--tasks", "gen:{ws}/two.jsonl", "--concurrency", "0"],
        "--concurrency",
    ),
    ("monitor-nothing-to-check", "monitor", ["http://127.0.0.1:9/v1"], "nothing to check"),
    ("monitor-drift-without-log", "monitor", ["http://127.0.0.1:9/v1", "--drift"], "--requests DIR"),
    (
        "monitor-drift-log-missing",
        "monitor",
        ["http://127.0.0.1:9/v1", "--drift", "--requests", "{ws}/nope"],
        "--requests {ws}/nope: not a directory",
    ),
    (
        "monitor-drift-reference-missing",
        "monitor",
        ["http://127.0.0.1:9/v1", "--drift", "--requests", "{ws}", "--reference", "{ws}/nope.jsonl"],
        "--reference {ws}/nope.jsonl: no such file",
    ),
    (
        "monitor-report-no-history",
        "monitor report",
        ["--history", "{ws}/nope.jsonl", "--drift-history", "{ws}/nope2.jsonl", "--out", "{ws}/report.html"],
        "nothing to report",
    ),
    (
        "monitor-report-over-a-users-file",
        "monitor report",
        ["--history", "{ws}/history.jsonl", "--drift-history", "{ws}/nope.jsonl", "--out", "{ws}/sft.jsonl"],
        "not a report kiln monitor wrote",
    ),
    ("serve-models-file-missing", "serve", ["--models-file", "{ws}/nope.yaml"], "--models-file {ws}/nope.yaml"),
    (
        "serve-models-file-bad-key",
        "serve",
        ["--models-file", "{ws}/models.yaml"],
        "--models-file {ws}/models.yaml: unknown key 'modle'",
    ),
    ("serve-blocklist-missing", "serve", ["{ws}/model", "--blocklist", "{ws}/nope.txt"], "--blocklist {ws}/nope.txt"),
    ("serve-model-and-models-file", "serve", ["{ws}/model", "--models-file", "{ws}/models.yaml"], "one of them"),
    ("export-no-model", "export", ["{ws}/nope", "{ws}/out"], "is neither a model directory"),
    (
        "import-no-source",
        "import",
        ["{ws}/nope", "{ws}/out"],
        "is neither a model directory, a GGUF file nor a Hugging Face hub id",
    ),
    (
        "finetune-no-base",
        "finetune",
        ["run_dir={ws}/r", "finetune.data={ws}/sft.jsonl", "finetune.base={ws}/nope"],
        "finetune.base",
    ),
    (
        "align-no-base",
        "align",
        [
            "run_dir={ws}/r",
            "align.data={ws}/sft.jsonl",
            "align.base={ws}/nope",
            "align.rewards=[{{fn: lmkiln.eval.rewards:length_penalty, args: {{target: 9}}}}]",
        ],
        "align.base: '{ws}/nope' is neither a stage name nor a model directory",
    ),
    # sampling flags
    (
        "generate-negative-temperature",
        "generate",
        ["{ws}/model", "--prompt", "hi", "--temperature", "-1"],
        "--temperature -1.0: expected 0",
    ),
    ("generate-top-p-above-1", "generate", ["{ws}/model", "--prompt", "hi", "--top-p", "2"], "--top-p 2.0"),
    ("generate-top-p-zero", "generate", ["{ws}/model", "--prompt", "hi", "--top-p", "0"], "--top-p 0.0"),
    ("generate-negative-top-k", "generate", ["{ws}/model", "--prompt", "hi", "--top-k", "-1"], "--top-k -1"),
    (
        "generate-negative-max-tokens",
        "generate",
        ["{ws}/model", "--prompt", "hi", "--max-tokens", "-5"],
        "--max-tokens -5",
    ),
    ("chat-negative-temperature", "chat", ["{ws}/model", "--temperature", "-0.5"], "--temperature -0.5"),
    ("chat-zero-max-tokens", "chat", ["{ws}/model", "--max-tokens", "0"], "--max-tokens 0"),
    # sizes and counts
    ("estimate-world-0", "estimate", ["--world", "0"], "--world 0: expected 1 or more"),
    ("estimate-world-negative", "estimate", ["--world", "-3"], "--world -3: expected 1 or more"),
    ("tune-zero-trials", "tune", ["run_dir={ws}/r", "--trials", "0"], "--trials must be 1 or more"),
    ("serve-zero-batch", "serve", ["{ws}/model", "--max-batch", "0"], "--max-batch 0"),
    ("serve-busy-port", "serve", ["{ws}/model", "--port", "{busy}"], "cannot listen on 127.0.0.1:{busy}"),
    # empty inputs, named by the stage that would produce the empty output
    (
        "data-empty-corpus",
        "data",
        ["run_dir={ws}/r", "data.sources=[{ws}/empty.txt]"],
        "data: no documents left (1 documents in, removed: empty 1)",
    ),
    (
        "run-empty-corpus",
        "run",
        ["run_dir={ws}/r", "data.sources=[{ws}/empty.txt]", "stages=[data,tokenizer]"],
        "data: no documents left",
    ),
    ("tokenizer-before-data", "tokenizer", ["run_dir={ws}/r"], "stage 'data' has not finished"),
    (
        "pretrain-empty-token-shard",
        "pretrain",
        ["run_dir={ws}/emptyrun"] + [t for t in TINY if t.startswith(("model.", "pretrain."))],
        "the token shard is empty",
    ),
    (
        "finetune-empty-validation-split",
        "finetune",
        ["run_dir={ws}/r", "finetune.data={ws}/two.jsonl", "finetune.base={ws}/model"],
        "the validation split of",
    ),
    (
        "finetune-counterfactual-pairs-missing",
        "finetune",
        ["run_dir={ws}/r", "finetune.data={ws}/sft.jsonl", "finetune.base={ws}/model"]
        + ["finetune.counterfactual.enabled=true", "finetune.counterfactual.pairs=[{ws}/nope.tsv]"],
        "counterfactual.pairs: '{ws}/nope.tsv' does not exist",
    ),
    # text that is not UTF-8: file, line and byte offset
    (
        "data-truncated-utf8-text",
        "data",
        ["run_dir={ws}/r", "data.sources=[{ws}/cut.txt]"],
        "cut.txt:2: not valid UTF-8 at byte 62",
    ),
    (
        "data-bad-utf8-jsonl",
        "data",
        ["run_dir={ws}/r", "data.sources=[{ws}/cut.jsonl]"],
        "cut.jsonl:2: not valid UTF-8 at byte 27",
    ),
    (
        "finetune-bad-utf8-csv",
        "finetune",
        ["run_dir={ws}/r", "finetune.data={ws}/cut.csv", "finetune.base={ws}/model"],
        "cut.csv:3: not valid UTF-8 at byte 31",
    ),
    (
        "eval-bad-utf8-task-file",
        "eval",
        ["--models", "{ws}/model", "--tasks", "{ws}/task.jsonl"],
        "task.jsonl:2: not valid UTF-8 at byte 49",
    ),
    ("run-bad-utf8-recipe", "run", ["{ws}/recipe.yaml"], "recipe.yaml:2: not valid UTF-8 at byte 13"),
    # mistakes that already had their line
    ("run-unknown-key", "run", ["run_dir={ws}/r", "pretrain.max_stepz=10"], "unknown key 'pretrain.max_stepz'"),
    ("pretrain-bad-value", "pretrain", ["run_dir={ws}/r", "pretrain.lr=-1"], "bad value for 'pretrain.lr'"),
    ("data-missing-source", "data", ["run_dir={ws}/r", "data.sources=[{ws}/missing.txt]"], "does not exist"),
    ("eval-unknown-task", "eval", ["run_dir={ws}/r", "eval.tasks=[nonsense]"], "is not perplexity"),
    ("import-unknown-dtype", "import", ["{ws}/model", "{ws}/out", "--dtype", "fp8"], "--dtype 'fp8'"),
    ("run-missing-recipe", "run", ["{ws}/no-such-recipe.yaml"], "does not exist"),
]
VERBS = {
    "run",
    "data",
    "tokenizer",
    "pretrain",
    "finetune",
    "align",
    "eval",
    "tune",
    "estimate",
    "generate",
    "chat",
    "serve",
    "monitor",
    "monitor report",
    "import",
    "quantize",
    "export",
}


def test_the_matrix_covers_every_verb():
    from lmkiln.cli import build_parser

    parser = build_parser()
    verbs = set(next(a for a in parser._actions if a.dest == "verb").choices)
    assert verbs == VERBS and {c[1] for c in CASES} == VERBS


@pytest.mark.parametrize("case,verb,args,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_touches_nothing(ws, case, verb, args, expected, capsys):
    sock = busy_port()
    busy = sock.getsockname()[1]
    fill = {"ws": str(ws), "busy": str(busy)}
    argv = ["-q", verb] + [a.format(**fill) for a in args]
    before = snapshot(ws)
    try:
        code = main(argv)
    finally:
        sock.close()
    out, err = capsys.readouterr()
    assert code == 2, (argv, err)
    assert err.count("\n") == 1 and err.startswith("kiln: error: ") and "Traceback" not in err, err
    assert expected.format(**fill) in err, err
    assert snapshot(ws) == before  # nothing written, nothing removed, nothing touched


def test_force_writes_beside_a_users_files_and_replaces_only_its_own(ws, tmp_path):
    user = tmp_path / "mine"
    shutil.copytree(ws / "mine", user)
    assert main(["-q", "import", str(ws / "model"), str(user), "--force"]) == 0
    assert (user / "NOTES.txt").read_text() == "the user's own notes\n" and (user / "config.json").is_file()
    # a second export into it replaces what lmkiln wrote there (an earlier import) and nothing else
    assert main(["-q", "export", str(ws / "model"), str(user), "--format", "gguf", "--force"]) == 0
    assert sorted(p.name for p in user.iterdir()) == [".lmkiln-output.json", "Modelfile", "NOTES.txt", "model.gguf"]
    # a directory lmkiln wrote is its own to replace, without --force
    assert main(["-q", "import", str(ws / "model"), str(tmp_path / "ours")]) == 0
    assert main(["-q", "import", str(ws / "model"), str(tmp_path / "ours")]) == 0
