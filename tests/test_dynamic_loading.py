"""Dynamic batch loading: the exponentiated-gradient update, category draws that follow the weights, and exact
resume of the sampler."""

import math

import pytest
import torch

from colossal_shear.data.domain_weights import DomainSampler, DomainWeights, parse_reference_losses


def test_update_rule_matches_the_formula():
    w = DomainWeights(["a", "b", "c"], [2, 1, 1], {"a": 2.0, "b": 3.0, "c": 1.0})
    new = w.update({"a": 2.5, "b": 3.0, "c": 0.5}).tolist()
    base = [math.log(0.5) + 0.5, math.log(0.25) + 0.0, math.log(0.25) - 0.5]
    z = sum(math.exp(x) for x in base)
    expected = [(1 - 1e-4) * math.exp(x) / z + 1e-4 / 3 for x in base]
    assert new == pytest.approx(expected, rel=1e-12)
    assert sum(new) == pytest.approx(1.0)
    assert new[0] > 0.5 and new[2] < 0.25  # the lagging domain gains, the ahead one loses


def test_reference_losses_parsing_and_errors():
    assert parse_reference_losses("en=2.1, zh=3") == {"en": 2.1, "zh": 3.0}
    for bad in ("en", "en=x", "=2", ""):
        with pytest.raises(ValueError, match="--reference_loss"):
            parse_reference_losses(bad)
    with pytest.raises(ValueError, match="missing"):
        DomainWeights(["en", "zh"], [1, 1], {"en": 1.0})


def test_draws_follow_the_weights_and_resume_exactly():
    cats = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    w = DomainWeights(["a", "b", "c"], [1, 1, 1], {"a": 0, "b": 0, "c": 0})
    w.weights = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    s = DomainSampler(cats, w, seed=3)
    drawn = s.take(4000)
    frac = [sum(cats[i] == c for i in drawn) / len(drawn) for c in "abc"]
    assert frac == pytest.approx([0.7, 0.2, 0.1], abs=0.03)
    state = s.state_dict()
    after = s.take(50)
    w2 = DomainWeights(["a", "b", "c"], [1, 1, 1], {"a": 0, "b": 0, "c": 0})
    s2 = DomainSampler(cats, w2, seed=3)
    s2.load_state_dict(state)
    assert s2.take(50) == after
    assert w2.weights.tolist() == [0.7, 0.2, 0.1]


def test_ranks_draw_from_disjoint_shards():
    cats = ["a"] * 10 + ["b"] * 10
    seen = []
    for r in range(2):
        w = DomainWeights(["a", "b"], [1, 1], {"a": 0, "b": 0})
        seen.append(set(DomainSampler(cats, w, dp_rank=r, dp_size=2).take(40)))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(20))
