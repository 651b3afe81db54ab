import pytest
import torch

from lmkiln.model.families.transformer import ModelArgs, RMSNorm, Transformer, _RMSNorm
from lmkiln.model.inference.generate import generate
from lmkiln.model.inference.kv_cache import KVCache
from lmkiln.model.io.hub import load_model, save_model


def tiny(**kw) -> Transformer:
    args = ModelArgs(
        vocab_size=97,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=kw.pop("kv", 2),
        intermediate_size=64,
        max_seq_len=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        **kw,
    )
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


def test_param_count_matches_formula():
    for kw in VARIANTS.values():
        model = tiny(**kw)
        unique = {id(p): p.numel() for p in model.parameters()}
        assert sum(unique.values()) == model.args.num_params()


VARIANTS = {
    "llama-tied-gqa": dict(tie_embeddings=True, kv=2),
    "llama-untied": dict(tie_embeddings=False, kv=4, rope_theta=500000.0),
    "qwen2": dict(arch="qwen2", tie_embeddings=False),
    "qwen3": dict(arch="qwen3", head_dim=16),  # head_dim apart from hidden / heads, as Qwen3 allows
    "mistral": dict(arch="mistral", sliding_window=8, tie_embeddings=False),
}
HF_CLASS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}


def _randomise_biases_and_norms(model):
    # init_weights leaves biases at 0 and norms at 1: perturb them so a misplaced one would show
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_transformers(tmp_path, variant):
    transformers = pytest.importorskip("transformers")
    model = tiny(**VARIANTS[variant])
    _randomise_biases_and_norms(model)
    save_model(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == HF_CLASS[model.args.arch]
    x = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()
    reloaded = load_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(x), ours)


@pytest.mark.parametrize("variant", ["llama-tied-gqa", "mistral"])
def test_kv_cache_equals_full_forward(variant):
    model = tiny(**VARIANTS[variant])
    x = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.args, 1, 32, "cpu", torch.float32)
        first = model(x[:, :12], cache=cache)
        chunk = model(x[:, 12:16], cache=cache)  # a multi-token chunk after the cache
        rest = torch.cat([model(x[:, i : i + 1], cache=cache) for i in range(16, 20)], dim=1)
    assert torch.allclose(torch.cat([first, chunk, rest], dim=1), full, atol=1e-5)


def test_greedy_generation_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny()
    save_model(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = [5, 17, 33, 8]
    ours = generate(model, prompt, 12, temperature=0.0)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=2)[
        0, len(prompt) :
    ].tolist()
    assert ours == theirs


@pytest.mark.parametrize("variant", ["llama-tied-gqa", "mistral"])
def test_batched_greedy_generation_equals_one_prompt_at_a_time(variant):
    from lmkiln.model.inference.generate import generate_greedy_batch

    model = tiny(**VARIANTS[variant])
    prompts = [[5, 17, 33, 8], [3], [9, 9, 2, 41, 7, 7, 12, 60, 1], [44, 45]]
    alone = [generate(model, p, 14, temperature=0.0) for p in prompts]
    stop = alone[2][3]  # one sequence stops early, the others go on
    alone = [generate(model, p, 14, temperature=0.0, stop_ids=[stop]) for p in prompts]
    assert generate_greedy_batch(model, prompts, 14, [stop], batch=3) == alone


def test_sampling_is_seeded_and_respects_stops():
    model = tiny()
    a = generate(model, [3, 4], 10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    b = generate(model, [3, 4], 10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    assert a == b and len(a) == 10
    first = generate(model, [3, 4], 10, temperature=0.0)[0]
    assert generate(model, [3, 4], 10, temperature=0.0, stop_ids=[first]) == []


def _hf_rms_norm(x, weight, eps):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def test_rms_norm_gradient_is_exact():
    """The hand-written backward of RMSNorm against autograd's, and against finite differences."""
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(12, 1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(12, generator=g, dtype=torch.float64) + 0.5)
    x = torch.randn(3, 5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: _RMSNorm.apply(a, w, 1e-5), (x, norm.weight))
    upstream = torch.randn(3, 5, 12, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad(norm(x), (x, norm.weight), upstream)
    ref = torch.autograd.grad(_hf_rms_norm(x, norm.weight, 1e-5), (x, norm.weight), upstream)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(ours, ref))


def test_rms_norm_in_bf16_matches_hf_numerics():
    norm = RMSNorm(64, 1e-6)
    x = (torch.randn(4, 64) * 3).to(torch.bfloat16).requires_grad_(True)
    ours, ref = norm(x), _hf_rms_norm(x, norm.weight, 1e-6)
    assert ours.dtype == ref.dtype and torch.equal(ours, ref)
    up = torch.randn_like(ours)
    assert torch.allclose(
        torch.autograd.grad(ours, x, up)[0].float(), torch.autograd.grad(ref, x, up)[0].float(), rtol=2e-2, atol=1e-2
    )


@pytest.mark.parametrize("shape", [(1, 1, 24), (3, 1, 24), (2, 8, 24), (4, 5, 24)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_few_rows_path_equals_f_linear(shape, bias, monkeypatch):
    """Decode-sized inputs take the row-block product (here forced: whether it is taken depends on the
    machine); more rows, or gradients, take F.linear."""
    from lmkiln.model import linear
    from lmkiln.model.linear import Linear

    monkeypatch.setattr(linear, "_ROW_BLOCKS_PAY", True)

    torch.manual_seed(0)
    layer = Linear(24, 36, bias=bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        got = layer(x)
    assert got.shape == (*shape[:-1], 36)
    assert torch.allclose(got, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)
    layer(x).sum().backward()  # with gradients on, the ordinary path
    assert layer.weight.grad is not None


@pytest.mark.parametrize("variant", [{}, {"sliding_window": 6, "arch": "mistral"}])
def test_static_cache_decode_equals_kv_cache(variant):
    """The compile-ready cache (whole-context attention under a mask, index writes) gives the same
    tokens and logits as the plain cache, eager."""
    from lmkiln.model.inference.kv_cache import StaticKVCache

    model = tiny(**variant)
    prompt = torch.tensor([[5, 9, 14, 3]])
    caches = KVCache(model.args, 1, 20, "cpu", torch.float32), StaticKVCache(model.args, 1, 64, "cpu", torch.float32)
    with torch.no_grad():
        outs = []
        for cache in caches:
            logits, rows = model(prompt, cache=cache, last_only=True), []
            for _ in range(12):
                rows.append(logits[0, -1])
                logits = model(logits[:, -1:].argmax(-1), cache=cache)
            outs.append(torch.stack(rows))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


@pytest.mark.slow
def test_compiled_decode_gives_the_same_tokens_and_logits():
    """The compiled step computes rotary embeddings and grouped-query attention in forms of its own
    (elementwise rotation, per-head sums on CPU): its logits equal the eager step's."""
    from lmkiln.model.inference.generate import _decode_step
    from lmkiln.model.inference.kv_cache import StaticKVCache

    model = tiny()
    assert generate(model, [5, 9, 14, 3], 10, compile=True) == generate(model, [5, 9, 14, 3], 10)
    caches = [StaticKVCache(model.args, 1, 64, "cpu", torch.float32) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(torch.tensor([[5, 9, 14, 3]]), cache=cache)
        for token in (7, 11, 13, 2, 40):
            eager = model(torch.tensor([[token]]), cache=caches[0])
            compiled = _decode_step(model)(torch.tensor([[token]]), cache=caches[1])
            assert torch.allclose(eager, compiled, atol=1e-5), (eager - compiled).abs().max()
    assert "_decode_step" not in model.state_dict() and not any("decode" in n for n, _ in model.named_modules())
