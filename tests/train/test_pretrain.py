import json
import shutil

import pytest
import torch

from lmkiln import data, tokenizer
from lmkiln.errors import UserError
from lmkiln.model.io.hub import load_model
from lmkiln.pipeline import run_stage
from lmkiln.train import pretrain as pretrain_stage
from lmkiln.train import run_pretrain
from lmkiln.train.metrics import read_metrics


class Killed(Exception):
    """Stands in for SIGKILL: the loop dies without its interrupt handler saving anything."""


def _prepare(recipe):
    data.run(recipe)
    tokenizer.run(recipe)


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "pretrain" / "metrics.jsonl") if "loss" in r]


def _interrupt_at(step, exc):
    def hook(s):
        if s == step:
            raise exc

    return hook


@pytest.fixture
def prepared(tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    _prepare(recipe)
    return recipe


@pytest.mark.slow
def test_pretrain_writes_hf_model_and_manifest(prepared):
    manifest = run_pretrain(prepared)
    out = prepared.run_dir / "pretrain"
    assert manifest["metrics"]["steps"] == 12
    assert (out / "final" / "config.json").is_file() and (out / "final" / "trainer_state.pt").is_file()
    assert (out / "loss.png").stat().st_size > 1000
    losses = _losses(prepared.run_dir)
    assert [s for s, _ in losses] == [3, 6, 9, 12] and losses[-1][1] < losses[0][1]


@pytest.mark.slow
@pytest.mark.parametrize("exc,resume_step", [(Killed(), 8), (KeyboardInterrupt(), 10)])
def test_resume_after_interruption_equals_uninterrupted(prepared, tmp_path, exc, resume_step):
    # the uninterrupted reference, in its own run directory
    ref_dir = tmp_path / "ref"
    shutil.copytree(prepared.run_dir, ref_dir)
    reference = prepared.model_copy(update={"run_dir": ref_dir})
    run_pretrain(reference)

    out = prepared.run_dir / "pretrain"
    out.mkdir(parents=True, exist_ok=True)
    with pytest.raises(type(exc)):
        pretrain_stage.build(prepared, out, on_step=_interrupt_at(10, exc))
    assert not (out / "manifest.json").exists() and not (out / "final").exists()
    newest = sorted((out / "checkpoints").glob("step_*"))[-1].name
    assert newest == f"step_{resume_step:07d}"
    # a half-written checkpoint (as left by a kill during saving) must be ignored
    (out / "checkpoints" / ".step_0000011.tmp-1").mkdir()
    manifest = run_pretrain(prepared)
    assert manifest["metrics"]["resumed_from"] == resume_step
    assert manifest["metrics"]["steps"] == 12
    assert _losses(prepared.run_dir) == _losses(ref_dir)
    a, b = load_model(out / "final").state_dict(), load_model(ref_dir / "pretrain" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_manifest_skips_and_force_redoes(prepared):
    first = run_pretrain(prepared)
    again = run_pretrain(prepared)
    assert again.get("skipped") and again["finished_at"] == first["finished_at"]
    changed = prepared.model_copy(deep=True)
    changed.pretrain.max_steps = 8
    assert run_stage("pretrain", changed)["metrics"]["steps"] == 8  # a config change reruns
    forced = run_pretrain(prepared, force=True)
    assert not forced.get("skipped") and forced["metrics"]["steps"] == 12


def test_stage_without_manifest_is_not_accepted(tiny_recipe):
    recipe = tiny_recipe()
    data.run(recipe)
    (recipe.run_dir / "data" / "manifest.json").unlink()  # as if killed before finishing
    with pytest.raises(UserError, match="stage 'data' has not finished"):
        tokenizer.run(recipe)


@pytest.mark.slow
def test_saved_model_loads_in_transformers_with_equal_logits(prepared):
    transformers = pytest.importorskip("transformers")
    run_pretrain(prepared)
    final = prepared.run_dir / "pretrain" / "final"
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ours = load_model(final).eval()
    x = torch.randint(0, ours.args.vocab_size, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(x), hf(x).logits, atol=1e-4, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(final)
    assert hf_tok.eos_token == "<|eos|>" and "<|assistant|>" in hf_tok.chat_template
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.slow
def test_bad_model_dims_are_a_user_error(tiny_recipe):
    recipe = tiny_recipe("model.num_heads=3")
    _prepare(recipe)
    with pytest.raises(UserError, match="model:"):
        run_pretrain(recipe)


def test_fim_rearranges_windows_prefix_suffix_middle():
    import numpy as np

    from lmkiln.train.pretrain import batch_at, fim_rearrange

    window = np.arange(100, 120)
    rng = np.random.default_rng(0)
    out = fim_rearrange(window, rng, 1, 2, 3)
    assert len(out) == len(window) and out[0] == 1
    s, m = list(out).index(3), list(out).index(2)
    assert 0 < s < m  # prefix, then suffix, then middle
    full = np.concatenate([[1], out[1:s], [3], out[s + 1 : m], [2], out[m + 1 :]])
    assert np.array_equal(full, out)
    # every token kept comes from the window, in two runs that were contiguous there
    assert set(out[out >= 100]) <= set(window)
    tokens = np.arange(1000, 2000)
    x, _ = batch_at(tokens, 0, 5, 0, 8, 16, fim=(1.0, 1, 2, 3))
    assert (x[:, 0] == 1).all()
    plain, _ = batch_at(tokens, 0, 5, 0, 8, 16)
    assert (plain[:, 1:] - plain[:, :-1] == 1).all()


@pytest.mark.slow
def test_pretrain_with_fim(prepared):
    recipe = prepared.model_copy(deep=True)
    recipe.pretrain.fim_rate = 0.5
    assert run_pretrain(recipe)["metrics"]["steps"] == 12


@pytest.mark.slow
def test_prefetched_batches_equal_inline_batches(prepared):
    """The accelerator path reads the next step on a thread; its batches must be the inline ones."""
    from lmkiln.tokenizer.encode import open_shard
    from lmkiln.train.dist import DistContext
    from lmkiln.train.loop import Plan, _Batches
    from lmkiln.train.pretrain import CausalLM

    tokens, _ = open_shard(prepared.run_dir / "tokenizer" / "train")
    inline = CausalLM(prepared, None, tokens, tokens, 2, DistContext(device=torch.device("meta")), None).micro_batches
    loop = _Batches(Plan("pretrain", 4, inline, None, None, None, prefetch=True))
    try:
        for step in range(4):
            fetched = loop(step)
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(fetched, inline(step)))
    finally:
        loop.close()
