import pytest
import torch
import torch.nn.functional as F

from lmkiln.model import loss as linear_ce
from lmkiln.model.loss import linear_cross_entropy


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(linear_ce, "LOGITS_PER_CHUNK", 7 * 50)  # 7 rows a chunk: several chunks per call
    monkeypatch.setattr(linear_ce, "MIN_CHUNK_ROWS", 1)


def _inputs(train_weight: bool):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(23, 16, generator=g, dtype=torch.float64).requires_grad_(True)
    w = (torch.randn(50, 16, generator=g, dtype=torch.float64) * 0.5).requires_grad_(train_weight)
    t = torch.randint(0, 50, (23,), generator=g)
    return h, w, t


@pytest.mark.parametrize("train_weight", [False, True])
@pytest.mark.parametrize("upstream", ["mean", "per-row"])
def test_equals_cross_entropy_of_the_full_logits(train_weight, upstream):
    weights = torch.linspace(0.1, 2.0, 23, dtype=torch.float64) if upstream == "per-row" else None
    results = []
    for fn in (
        lambda h, w, t: linear_cross_entropy(h, w, t),
        lambda h, w, t: F.cross_entropy(h @ w.t(), t, reduction="none"),
    ):
        h, w, t = _inputs(train_weight)
        loss = fn(h, w, t)
        (loss.mean() if weights is None else (loss * weights).sum()).backward()
        results.append((loss.detach(), h.grad, w.grad))
    (l1, gh1, gw1), (l2, gh2, gw2) = results
    assert torch.allclose(l1, l2, atol=1e-6) and torch.allclose(gh1, gh2, atol=1e-6)
    assert (gw1 is None) == (gw2 is None) == (not train_weight)
    if train_weight:
        assert torch.allclose(gw1, gw2, atol=1e-6)


def test_without_gradients_it_only_scores():
    h, w, t = _inputs(False)
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(h, w, t), F.cross_entropy(h @ w.t(), t, reduction="none"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_confident_wrong_rows_keep_their_exact_loss(dtype):
    """Rows whose target probability underflows (losses in the hundreds) are scored from their logits."""
    h, w, t = _inputs(True)
    h = (h.detach() * 40).to(dtype).requires_grad_(True)
    w = w.detach().to(dtype).requires_grad_(True)
    loss = linear_cross_entropy(h, w, t)
    want = F.cross_entropy(h @ w.t(), t, reduction="none")
    assert want.max() > 200 and torch.isfinite(loss).all()
    assert torch.allclose(loss, want, rtol=1e-5)
    loss.mean().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want.mean().backward()
    assert torch.allclose(gh, h.grad, atol=1e-5) and torch.allclose(gw, w.grad, atol=1e-5)
