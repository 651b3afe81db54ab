import random

import pytest
import torch

from lmkiln.data.examples import collate
from lmkiln.model.loss import IGNORE
from lmkiln.train.packing import best_fit, pack
from tests.model.test_transformer import tiny


def _examples(lengths, seed=0):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, 97) for _ in range(n)]
        out.append((ids, ids[1:] + [IGNORE]))
    return out


def test_best_fit_places_every_example_once_within_the_limit():
    lengths = [random.Random(i).randrange(1, 40) for i in range(300)]
    bins = best_fit(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= sum(lengths) / 64 * 1.25 + 1  # close to the lower bound


@pytest.mark.parametrize("kw", [dict(), dict(arch="mistral", sliding_window=5)])
def test_packed_examples_do_not_see_each_other(kw):
    model = tiny(**kw)
    examples = _examples([7, 12, 5, 9])
    rows = pack(examples, 20)
    x, y, seg = collate(rows, pad_id=2)
    with torch.no_grad():
        packed = model(x, segments=seg)
        for r, (ids, _, segments) in enumerate(rows):
            for s in set(segments):
                cols = [i for i, v in enumerate(segments) if v == s]
                alone = model(torch.tensor([[ids[i] for i in cols]]))[0]
                assert torch.allclose(packed[r, cols], alone, atol=1e-5)
    # labels never cross from one example into the next
    for ids, labels, segments in rows:
        for i in range(len(ids) - 1):
            if segments[i] != segments[i + 1]:
                assert labels[i] == IGNORE


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randint(3, 97, (2, 16))
    grads = []
    for on in (False, True):
        model = tiny().train()
        model.gradient_checkpointing = on
        model(x).logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
