"""Per-row random draws (vlarl/algo/sampling.py): a row's draw depends on its own generator only."""

import pytest
import torch

from vlarl.algo import sampling


def gens(rows):
    return [torch.Generator().manual_seed(7 + i) for i in rows]


def test_per_row_draws_do_not_depend_on_the_other_rows():
    probs = torch.softmax(torch.randn(6, 256, generator=torch.Generator().manual_seed(0)), -1)
    full = sampling.multinomial(probs, gens(range(6)))
    assert full.shape == (6,) and full.dtype == torch.long
    assert torch.equal(full[2:5], sampling.multinomial(probs[2:5], gens(range(2, 5))))
    seeds = sampling.request_seeds(gens(range(6)), 6)
    assert seeds[3:] == sampling.request_seeds(gens(range(3, 6)), 3) and len(set(seeds)) == 6


def test_one_generator_for_the_batch_still_works():
    probs = torch.full((4, 256), 1 / 256)
    a = sampling.multinomial(probs, torch.Generator().manual_seed(1))
    assert torch.equal(a, sampling.multinomial(probs, torch.Generator().manual_seed(1)))
    assert sampling.request_seeds(torch.Generator().manual_seed(1), 4) == \
        sampling.request_seeds(torch.Generator().manual_seed(1), 4)
    with pytest.raises(ValueError, match="3 generators for 4 requests"):
        sampling.request_seeds(gens(range(3)), 4)
