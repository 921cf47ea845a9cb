"""⊥Grad (Prieto et al. 2025): gradients orthogonal to the weights, with the gradient's norm."""

from __future__ import annotations

import torch

from pips.optim import OPTIMIZERS, OrthoAdamW, orthogonalize_gradients_


def test_projected_gradient_is_orthogonal_to_the_weights_and_keeps_its_norm():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(7, 5, dtype=torch.float64))
    grad = torch.randn(7, 5, dtype=torch.float64) + 0.8 * weight.detach()  # a part along w
    weight.grad = grad.clone()
    orthogonalize_gradients_([weight])
    w, g, new = weight.detach().reshape(-1), grad.reshape(-1), weight.grad.reshape(-1)
    assert abs(torch.dot(new, w)) < 1e-12 * w.norm() * new.norm()
    torch.testing.assert_close(new.norm(), g.norm())
    # the paper's formula: g_perp = g - (w.g / w.w) w, rescaled to ||g||
    g_perp = g - torch.dot(w, g) / torch.dot(w, w) * w
    torch.testing.assert_close(new, g_perp * g.norm() / g_perp.norm())


def test_orthograd_steps_adamw_on_the_projected_gradient_and_saves_adamws_state():
    torch.manual_seed(0)
    start = torch.randn(4, 3)
    grads = [torch.randn(4, 3) for _ in range(3)]
    ours = torch.nn.Parameter(start.clone())
    reference = torch.nn.Parameter(start.clone())
    orthograd = OrthoAdamW([ours], lr=0.1, weight_decay=0.01)
    adamw = torch.optim.AdamW([reference], lr=0.1, weight_decay=0.01)
    for grad in grads:
        ours.grad = grad.clone()
        orthograd.step()
        w, g = reference.detach().reshape(-1), grad.reshape(-1)  # the projection, by hand
        g_perp = g - torch.dot(w, g) / torch.dot(w, w) * w
        reference.grad = (g_perp * g.norm() / g_perp.norm()).view(4, 3)
        adamw.step()
    torch.testing.assert_close(ours.detach(), reference.detach())
    assert "exp_avg" in orthograd.state_dict()["state"][0]  # checkpoints keep AdamW's moments
    assert isinstance(orthograd, torch.optim.AdamW) and OPTIMIZERS["orthograd"] is OrthoAdamW


def test_orthograd_runs_the_closure_before_projecting():
    weight = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
    optimizer = OrthoAdamW([weight], lr=0.1)

    def closure():
        optimizer.zero_grad()
        loss = (weight * torch.tensor([2.0, 1.0])).sum()  # gradient [2, 1]
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss.item() == 2.0
    torch.testing.assert_close(weight.grad, torch.tensor([0.0, 5**0.5]))  # along w removed
