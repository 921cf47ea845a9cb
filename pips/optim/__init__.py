"""Optimizers beyond torch's own. Depends on torch alone. ``OPTIMIZERS`` maps ``optim.name`` to a
class taking AdamW's arguments."""

from pips.optim.orthograd import OPTIMIZERS, OrthoAdamW, orthogonalize_gradients_, with_orthograd

__all__ = ["OPTIMIZERS", "OrthoAdamW", "orthogonalize_gradients_", "with_orthograd"]
