"""``random``'s options: a falsy seed (0) is a seed, not "unset"; counts and fractions refused by name
(issue #36; its selection is checked against a seeded permutation in tests/test_selection.py)."""

import pytest
import torch

from tokenreduce.core.layout import TokenLayout
from tokenreduce.core.reduction import ReduceContext
from tokenreduce.core.registry import get_method


def test_random_options():
    spec = get_method("random")
    assert spec.config_cls().keep == 0.25 and spec.config_cls().seed == 0
    assert spec.config_cls(seed=0, keep=1).seed == 0
    for options, message in [
        (dict(keep=0), "`keep` as a token count must be >= 1, got 0"),
        (dict(keep=0.0), "`keep` as a fraction must be in (0, 1], got 0.0"),
        (dict(keep=True), "`keep` must be a token count (int >= 1) or a fraction (float in (0, 1]), got True"),
        (dict(seed=-1), "`seed`"),
        (dict(seed=1.5), "`seed`"),
    ]:
        with pytest.raises(ValueError) as error:
            spec.config_cls(**options)
        assert message in str(error.value)


@pytest.mark.parametrize("keep, k", [(0.3, 4), (3, 3), (40, 13)])  # ceil(0.3 * 13 = 3.9) = 4; a count capped
def test_random_keeps_the_first_k_of_the_seeded_permutation(keep, k):
    x = torch.randn(13, 4)
    spec = get_method("random")
    context = ReduceContext(layout=TokenLayout.flat("image", 13), modality="image", row=0, item=0,
                            generator=torch.Generator().manual_seed(5))
    reduction = spec.method_cls(spec.config_cls(keep=keep, seed=5)).reduce(x, context)
    want = torch.randperm(13, generator=torch.Generator().manual_seed(5))[:k]
    assert sorted(reduction.sources.tolist()) == sorted(want.tolist())
