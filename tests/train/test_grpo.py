"""GRPO: the objective equals TRL's GRPOTrainer's (loss and gradients, each loss type), advantages are
normalised per group as TRL's are, the batched sampler gives each prompt its G completions, a run
trains on the one loop with its rewards logged, and bad reward functions are refused before any model
loads (import error, wrong signature) or, at run time, by row and function."""

import json

import pytest
import torch

from lmkiln.cli import main
from lmkiln.errors import UserError
from lmkiln.eval.rewards import load_rewards
from lmkiln.model.inference.generate import generate, sample_batch
from lmkiln.model.io.hub import load_model
from lmkiln.train import run_finetune
from lmkiln.train.grpo import completion_logprobs, group_advantages, grpo_loss

REWARD = "lmkiln.eval.rewards:regex_match"


def _prompts(path, n=24):
    rows = [{"instruction": f"Write a function number {i}.", "output": "def f():", "answer": "def"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tiny_recipe, trained_run, tmp_path, *extra):
    _, run_dir, _ = trained_run
    return tiny_recipe(
        f"finetune.data={_prompts(tmp_path / 'prompts.jsonl')}",
        "finetune.task=grpo",
        f"finetune.base={run_dir / 'finetune' / 'final'}",
        f'finetune.rewards=[{{fn: "{REWARD}", args: {{pattern: "\\\\("}}}}]',
        "finetune.grpo.generations=4",
        "finetune.grpo.max_completion_tokens=12",
        "finetune.batch_size=4",
        "finetune.epochs=1",
        "finetune.log_every=1",
        *extra,
        run_dir=tmp_path / "run",
    )


@pytest.mark.parametrize("loss_type,corrected", [("grpo", True), ("bnpo", True), ("dr_grpo", False)])
def test_one_step_equals_trls_grpo_trainer_loss_and_gradients(trained_run, loss_type, corrected):
    """Fixed completions on the tiny model: lmkiln's loss and every parameter's gradient equal those of
    TRL's GRPOTrainer (same config: beta, clip range, loss type) within 1e-5, with a reference that
    differs from the policy so the KL term counts."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    model_dir = trained_run[1] / "finetune" / "final"
    ours, reference = load_model(model_dir).eval(), load_model(model_dir).eval()  # no dropout: as TRL's here
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), pad_token="<|pad|>")
    g, t, beta, eps, eps_high, temperature = 4, 6, 0.04, 0.2, 0.28, 0.9
    args = GRPOConfig(
        output_dir=str(trained_run[1] / "trl"), report_to="none", use_cpu=True, per_device_train_batch_size=2 * g,
        num_generations=g, max_completion_length=t, beta=beta, loss_type=loss_type, epsilon=eps,
        epsilon_high=eps_high, temperature=temperature, bf16=False, use_bias_correction_kl=corrected,
    )  # fmt: skip
    rows = datasets.Dataset.from_list([{"prompt": "def f"}] * (2 * g))
    trainer = GRPOTrainer(model=hf, reward_funcs=[lambda completions, **_: [0.0] * len(completions)], args=args,
                          train_dataset=rows, processing_class=tok)  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1
    torch.manual_seed(0)
    with torch.no_grad():  # the reference moved away from the policy, the same way on both sides
        mine = dict(reference.named_parameters())
        for name, p in trainer.ref_model.named_parameters():
            noise = 0.05 * torch.randn_like(p)
            p.add_(noise)
            mine[name].add_(noise)
    prompts = [[5, 6, 7], [9, 10, 11]]
    completions = [[int(x) for x in torch.randint(12, 200, (n,))] for n in (6, 3, 5, 1, 6, 2, 4, 6)]
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.2]), g, "group")
    repeated = [p for p in prompts for _ in range(g)]
    pad = tok.pad_token_id
    completion_ids = torch.tensor([c + [pad] * (t - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (t - len(c)) for c in completions])
    prompt_ids = torch.tensor(repeated)
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
    with torch.no_grad():
        ref_trl = trainer._get_per_token_logps_and_entropies(trainer.ref_model, input_ids, attention, t)[0]
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": advantages, "ref_per_token_logps": ref_trl,
    }  # fmt: skip
    theirs = trainer._compute_loss(hf, inputs)
    theirs.backward()

    logp, mask = completion_logprobs(ours, repeated, completions, pad, temperature)
    with torch.no_grad():
        ref = completion_logprobs(reference, repeated, completions, pad, temperature)[0]
    width = mask.shape[1]
    assert torch.allclose(ref[mask.bool()], ref_trl[:, :width][completion_mask[:, :width].bool()], atol=1e-5)
    loss, _ = grpo_loss(logp, logp.detach(), ref, advantages, mask, beta, eps, eps_high, loss_type, t, corrected)
    loss.backward()
    assert abs(loss.item() - theirs.item()) < 1e-5, (loss.item(), theirs.item())
    grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    mine = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert mine.keys() == grads.keys()
    worst = max((mine[n] - grads[n]).abs().max().item() for n in grads)
    assert worst < 1e-5, worst


def test_advantages_are_normalised_per_group_as_trl_does():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    grouped = rewards.view(-1, 4)
    std = trl_utils.nanstd(grouped, dim=1).repeat_interleave(4)
    expected = (rewards - grouped.mean(1).repeat_interleave(4)) / (std + 1e-4)
    assert torch.allclose(group_advantages(rewards, 4, "group"), expected)
    assert torch.equal(group_advantages(rewards, 4, "group")[4:], torch.zeros(4))  # one reward: no signal
    assert torch.allclose(group_advantages(rewards, 4, "none"), rewards - grouped.mean(1).repeat_interleave(4))


def test_the_sampler_gives_each_prompt_its_copies_and_greedy_equals_generate(trained_run):
    model = load_model(trained_run[1] / "finetune" / "final")
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    greedy = sample_batch(model, prompts, 6, temperature=0.0, copies=3)
    assert len(greedy) == 6 and greedy[0] == greedy[1] == greedy[2] == generate(model, prompts[0], 6)
    assert greedy[3] == generate(model, prompts[1], 6)
    torch.manual_seed(0)
    sampled = sample_batch(model, prompts, 6, temperature=1.5, copies=4)
    assert len({tuple(s) for s in sampled[:4]}) > 1  # the copies sample on their own
    logp, mask = completion_logprobs(model, [prompts[0]], [greedy[0]], pad=0)
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompts[0] + greedy[0]])).float(), -1)[0]
    expected = full[len(prompts[0]) - 1 : -1].gather(-1, torch.tensor(greedy[0])[:, None])[:, 0]
    assert torch.allclose(logp[0], expected, atol=1e-5) and mask.sum() == len(greedy[0])


def test_a_grpo_run_trains_and_logs_its_rewards(trained_run, tiny_recipe, tmp_path):
    recipe = _recipe(tiny_recipe, trained_run, tmp_path, "finetune.method=lora", "finetune.lr=1e-2")
    m = run_finetune(recipe)["metrics"]
    assert m["task"] == "grpo" and m["generations"] == 4 and m["steps"] >= 4
    assert 0 <= m["base_val_reward"] <= 1 and 0 <= m["val_reward"] <= 1
    records = [json.loads(x) for x in (tmp_path / "run" / "finetune" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "reward" in r and "loss" in r]
    assert logged and all({"reward/regex_match", "kl", "clip_fraction", "completion_length"} <= set(r) for r in logged)
    assert (tmp_path / "run" / "finetune" / "final" / "model.safetensors").is_file()


def test_bad_rewards_are_refused_before_any_model_loads(tmp_path, capsys):
    with pytest.raises(UserError, match="cannot import no_such_module"):
        load_rewards(["no_such_module:f"])
    with pytest.raises(UserError, match="has no function nope"):
        load_rewards(["lmkiln.eval.rewards:nope"])
    (tmp_path / "mine.py").write_text("def two_args(prompt, completion):\n    return 1.0\n")
    with pytest.raises(UserError, match=r"two_args cannot be called as f\(prompt, completion, row"):
        load_rewards([f"{tmp_path / 'mine.py'}:two_args"])
    with pytest.raises(UserError, match="at least one reward"):
        load_rewards([])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("finetune:\n  task: grpo\n  base: /nonexistent\n  rewards: [no_such_module:f]\n")
    assert main(["finetune", str(recipe)]) == 2
    assert "finetune.rewards" in capsys.readouterr().err


def test_a_reward_that_fails_names_the_row_and_function(trained_run, tiny_recipe, tmp_path):
    (tmp_path / "bad.py").write_text("def broken(prompt, completion, row):\n    return row['missing']\n")
    recipe = _recipe(tiny_recipe, trained_run, tmp_path, f'finetune.rewards=["{tmp_path / "bad.py"}:broken"]')
    with pytest.raises(UserError, match=r"broken raised on row .*prompts.jsonl:\d+ \(completion 1\): KeyError"):
        run_finetune(recipe)
