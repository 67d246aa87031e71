"""Losses: the reproducible cross-entropy used on CUDA agrees with torch's fused kernel."""

import torch
import torch.nn.functional as F

from segscale.losses import CrossEntropyLoss, cross_entropy_by_reductions
from segscale.registry import LOSSES


def test_cross_entropy_by_reductions_matches_torch_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (4, 16, 16), generator=g)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        a = (torch.randn(4, 3, 16, 16, generator=g) * 4).to(dtype).requires_grad_()
        b = a.detach().clone().requires_grad_()
        ours, theirs = cross_entropy_by_reductions(a, target), F.cross_entropy(b, target)
        ours.backward()
        theirs.backward()
        torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
        torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol)


def test_ce_in_the_registry_is_the_reproducible_cross_entropy():
    assert LOSSES.resolve("ce") is CrossEntropyLoss
    logits, target = torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 8, 8))
    # on the CPU it is torch's kernel itself, so CPU results stay bit-identical
    assert torch.equal(CrossEntropyLoss()(logits, target), F.cross_entropy(logits, target))
    # class logits (N, C), as in the classification task
    flat = torch.randn(5, 3)
    assert torch.equal(
        CrossEntropyLoss()(flat, target[0, 0, :5] % 3), F.cross_entropy(flat, target[0, 0, :5] % 3)
    )
