"""The gate maths against its closed form."""

import math

import torch

from sparsecirc.gates import (causal_mask, deterministic_gates, expected_edges, expected_gates, gate_logits,
                              n_causal_pairs, sample_gates)


def _qk(batch=3, pos=5, heads=2, d_head=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, pos, heads, d_head, generator=g), torch.randn(batch, pos, heads, d_head, generator=g)


def test_logits_are_scaled_dot_products_plus_bias():
    q, k = _qk()
    logits = gate_logits(q, k, bias=3.0)
    assert logits.shape == (3, 2, 5, 5)
    b, h, i, j = 1, 1, 4, 2
    assert math.isclose(logits[b, h, i, j].item(), (q[b, i, h] @ k[b, j, h]).item() / 2 + 3.0, rel_tol=1e-5)


def test_expected_edges_is_the_sum_of_sigmoids_over_causal_pairs_only():
    q, k = _qk()
    logits = gate_logits(q, k, bias=1.0)
    by_hand = sum(torch.sigmoid(logits[..., i, j]) for i in range(5) for j in range(i + 1))
    assert torch.allclose(expected_edges(logits), by_hand, atol=1e-5)
    assert (expected_gates(logits)[..., 0, 1:] == 0).all()  # key after query: never counted
    # With every gate certainly open, the expectation is the number of causal pairs.
    assert torch.allclose(expected_edges(torch.full((2, 7, 7), 50.0)), torch.full((2,), float(n_causal_pairs(7))))
    assert n_causal_pairs(11) == 66 and causal_mask(3).sum() == 6


def test_deterministic_threshold_at_zero():
    logits = torch.tensor([[-1.0, -1e-6, 0.0, 1e-6, 2.0]])
    assert deterministic_gates(logits).tolist() == [[0.0, 0.0, 0.0, 1.0, 1.0]]


def test_samples_are_hard_and_bernoulli_with_sigmoid_probability():
    logits = torch.tensor([-2.0, 0.0, 1.0, 3.0]).expand(40_000, 4)
    gates = sample_gates(logits, torch.Generator().manual_seed(0))
    assert set(gates.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(gates.mean(0), torch.sigmoid(logits[0]), atol=0.01)


def test_straight_through_gradient_is_the_gradient_of_the_noisy_sigmoid():
    logits = torch.tensor([0.5, -0.5, 3.0], requires_grad=True)
    generator = torch.Generator().manual_seed(1)
    gates = sample_gates(logits, generator)
    gates.sum().backward()
    noise = torch.logit(torch.rand(3, generator=torch.Generator().manual_seed(1)), eps=1e-6)
    soft = torch.sigmoid(logits.detach() + noise)
    assert (logits.grad > 0).all()
    assert torch.allclose(logits.grad, soft * (1 - soft), atol=1e-6)


def test_seeded_samples_repeat():
    logits = torch.zeros(100)
    a = sample_gates(logits, torch.Generator().manual_seed(3))
    b = sample_gates(logits, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
