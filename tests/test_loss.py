"""Loss reweighting: hand-computed values for token, sample and square averaging."""

import math

import pytest
import torch

from vlmtrain.training.loss import PowerWeighting, token_weights, weighted_cross_entropy

LN2 = math.log(2)


def two_samples():
    """Sample 0: one token, logits (ln3, 0), target 1 -> CE = ln 4.
    Sample 1: four tokens, logits (0, 0) -> CE = ln 2 each. Vocabulary of two."""
    logits = torch.tensor([[math.log(3), 0.0]] + [[0.0, 0.0]] * 4)
    hidden = logits  # with an identity lm_head, hidden states are the logits
    targets = torch.tensor([1, 0, 1, 0, 1])
    sample_index = torch.tensor([0, 1, 1, 1, 1])
    num_supervised = torch.tensor([1, 4])
    return hidden, torch.eye(2), targets, sample_index, num_supervised


@pytest.mark.parametrize(
    "power, expected",
    [
        (0.0, 6 * LN2 / 5),  # token: (ln4 + 4 ln2) / 5
        (1.0, 3 * LN2 / 2),  # sample: (ln4 / 1 + 4 ln2 / 4) / 2
        (0.5, 4 * LN2 / 3),  # square: (ln4 * 1 + 4 ln2 / 2) / (1 + 4 / 2)
    ],
    ids=["token", "sample", "square"],
)
def test_reweighting_hand_computed(power, expected):
    hidden, head, targets, sample_index, counts = two_samples()
    w = token_weights(PowerWeighting(power), counts, sample_index)
    loss = weighted_cross_entropy(hidden, head, targets, w) / w.sum()
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_square_weights_are_inverse_sqrt():
    w = PowerWeighting(0.5)(torch.tensor([1, 4, 16, 100]))
    assert torch.allclose(w, torch.tensor([1.0, 0.5, 0.25, 0.1]))


def test_chunked_equals_unchunked_with_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    head = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    w = torch.rand(37)
    full = weighted_cross_entropy(hidden, head, targets, w, chunk_size=1000)
    g_full = torch.autograd.grad(full, (hidden, head))
    chunked = weighted_cross_entropy(hidden, head, targets, w, chunk_size=5)
    g_chunked = torch.autograd.grad(chunked, (hidden, head))
    assert torch.allclose(full, chunked, atol=1e-5)
    for a, b in zip(g_full, g_chunked):
        assert torch.allclose(a, b, atol=1e-5)


def test_unaligned_vocabulary_is_padded_without_changing_loss_or_gradients():
    """An odd vocabulary (InternLM2: 92553) is padded to a multiple of 8 for the head's matmul
    (aligned rows of logits); the padding gets -inf logits, so loss and gradients are unchanged."""
    from vlmtrain.training.loss import ALIGN, _logits

    torch.manual_seed(0)
    hidden = torch.randn(23, 16, requires_grad=True)
    head = torch.nn.Linear(16, 53, bias=False)
    assert _logits(hidden, head).shape == (23, 56) and 56 % ALIGN == 0
    targets = torch.randint(0, 53, (23,))
    w = torch.rand(23)
    got = weighted_cross_entropy(hidden, head, targets, w, chunk_size=10)
    g_got = torch.autograd.grad(got, (hidden, head.weight))
    ref = (torch.nn.functional.cross_entropy(hidden @ head.weight.T, targets, reduction="none") * w).sum()
    g_ref = torch.autograd.grad(ref, (hidden, head.weight))
    torch.testing.assert_close(got, ref)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b)
