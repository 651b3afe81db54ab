import pytest

from lmkiln import data, tokenizer
from lmkiln.errors import UserError
from lmkiln.train import run_pretrain
from lmkiln.train.metrics import read_metrics
from lmkiln.train.optim import cosine_lr, make_optimizer, wsd_lr
from tests.model.test_transformer import tiny


def test_cosine_schedule_shape():
    lrs = [cosine_lr(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert cosine_lr(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)


def test_wsd_schedule_is_flat_then_decays_linearly():
    lrs = [wsd_lr(s, 100, 1.0, 10, 0.0, 0.2) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1)
    assert all(lr == 1.0 for lr in lrs[9:80])
    assert lrs[90] == pytest.approx(0.5) and lrs[100] == pytest.approx(0.0)


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = tiny(tie_embeddings=False)
    opt = make_optimizer(model, "muon", 1e-3, 0.1)
    muon = {id(p) for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert names and all(".layers." in n and n.endswith("proj.weight") for n in names)
    adamw = {id(p) for g in opt.optimizers["adamw"].param_groups for p in g["params"]}
    assert not muon & adamw and len(muon | adamw) == len(list(model.parameters()))
    # weight decay only on matrices in the AdamW part
    for group in opt.optimizers["adamw"].param_groups:
        assert all(p.dim() >= 2 for p in group["params"]) == (group["weight_decay"] > 0)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["pretrain.optimizer=muon", "pretrain.lr=0.02"], ["pretrain.schedule=wsd"]])
def test_pretrain_with_muon_and_wsd_learns(tiny_recipe, extra):
    recipe = tiny_recipe(*extra)
    data.run(recipe)
    tokenizer.run(recipe)
    run_pretrain(recipe)
    losses = [r["loss"] for r in read_metrics(recipe.run_dir / "pretrain" / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_non_finite_loss_stops_or_skips(tiny_recipe):
    recipe = tiny_recipe("pretrain.lr=1e30", "pretrain.warmup_steps=0", "pretrain.grad_clip=0")
    data.run(recipe)
    tokenizer.run(recipe)
    with pytest.raises(UserError, match="loss became .* at step .*pretrain.on_nan=skip"):
        run_pretrain(recipe)
    skip = recipe.model_copy(deep=True)
    skip.pretrain.on_nan = "skip"
    assert run_pretrain(skip)["metrics"]["steps"] == 12  # runs to the end, skipping bad updates


def test_batch_tokens_sets_accumulation(tiny_recipe):
    from lmkiln.train.pretrain import _grad_accum

    recipe = tiny_recipe("pretrain.batch_tokens=1K")  # 4 × 64 per micro-batch -> 4 micro-batches
    assert _grad_accum(recipe, 1) == 4 and _grad_accum(recipe, 2) == 2
