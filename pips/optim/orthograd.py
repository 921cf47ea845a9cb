"""⊥Grad (Prieto et al. 2025, "Grokking at the Edge of Numerical Stability", Sec. 6).

Past the point of 100% training accuracy the cross-entropy keeps falling fastest by scaling the
weights up along their own direction (the "naive loss minimisation" direction), which drives the
logits towards Softmax Collapse instead of learning. ⊥Grad removes from each parameter tensor's
gradient its component along the weights and rescales what is left to the gradient's norm::

    g_perp = g - (w . g / w . w) w,        g_new = g_perp * ||g|| / ||g_perp||

(each tensor flattened; as in the authors' code, with ``eps`` in both denominators), then lets the
base optimizer step on ``g_new``. :func:`with_orthograd` turns any ``torch.optim.Optimizer`` class
into its ⊥Grad version; :class:`OrthoAdamW` is AdamW's, the runner's ``optim.name=orthograd``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

EPS = 1e-30


@torch.no_grad()
def orthogonalize_gradients_(parameters: Iterable[torch.Tensor], eps: float = EPS) -> None:
    """Replace each ``p.grad`` in place by its part orthogonal to ``p``, rescaled to ``||p.grad||``."""
    for parameter in parameters:
        if parameter.grad is None:
            continue
        dtype = torch.promote_types(parameter.dtype, torch.float32)  # at least float32
        weight, grad = parameter.reshape(-1).to(dtype), parameter.grad.reshape(-1).to(dtype)
        projection = torch.dot(weight, grad) / (torch.dot(weight, weight) + eps)
        orthogonal = grad - projection * weight
        orthogonal = orthogonal * (grad.norm() / (orthogonal.norm() + eps))
        parameter.grad.copy_(orthogonal.view_as(parameter.grad))


def with_orthograd(optimizer_class: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """A subclass of ``optimizer_class`` whose ``step`` first orthogonalizes every gradient. Its
    state, param groups and schedulers are the base optimizer's own, so checkpoints and LR
    schedules work unchanged. A closure (Lightning passes one) runs before the projection."""

    class OrthoGrad(optimizer_class):
        def step(self, closure: Callable[[], torch.Tensor] | None = None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                orthogonalize_gradients_(group["params"])
            super().step()
            return loss

    OrthoGrad.__name__ = OrthoGrad.__qualname__ = f"Ortho{optimizer_class.__name__}"
    OrthoGrad.__doc__ = f"⊥Grad around {optimizer_class.__name__} (Prieto et al. 2025)."
    return OrthoGrad


OrthoAdamW = with_orthograd(torch.optim.AdamW)

# optim.name -> optimizer class, all taking AdamW's arguments
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "orthograd": OrthoAdamW,
}
