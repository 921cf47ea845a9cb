"""Quantizers: every class honours the :class:`~pips.quantizers.base.Quantizer` contract.

``forward(z, **schedule_values)`` on ``z: [..., dim]`` returns a :class:`QuantizerOutput`
``(quantized, indices, loss, logits, stats)``; ``codes_to_quantized(indices)`` decodes. Depends on
torch alone, so these can be imported into any model. ``QUANTIZERS`` maps config names to classes.
"""

from pips.quantizers.base import Quantizer, QuantizerOutput, usage_stats
from pips.quantizers.fsq import FSQ
from pips.quantizers.group import GroupVQ
from pips.quantizers.gumbel import GumbelQuantizer
from pips.quantizers.identity import IdentityQuantizer
from pips.quantizers.lfq import LFQ
from pips.quantizers.product import ProductVQ
from pips.quantizers.radial import RadialQuantizer
from pips.quantizers.residual import ResidualVQ
from pips.quantizers.residual_fsq import ResidualFSQ
from pips.quantizers.simvq import SimVQ
from pips.quantizers.vq import VectorQuantizer

QUANTIZERS: dict[str, type[Quantizer]] = {
    "gumbel": GumbelQuantizer,
    "vq": VectorQuantizer,
    "rvq": ResidualVQ,
    "gvq": GroupVQ,
    "simvq": SimVQ,
    "fsq": FSQ,
    "lfq": LFQ,
    "product_vq": ProductVQ,
    "residual_fsq": ResidualFSQ,
    "radial": RadialQuantizer,
    "none": IdentityQuantizer,
}

__all__ = [
    "FSQ",
    "LFQ",
    "QUANTIZERS",
    "GroupVQ",
    "GumbelQuantizer",
    "IdentityQuantizer",
    "Quantizer",
    "ProductVQ",
    "QuantizerOutput",
    "RadialQuantizer",
    "ResidualFSQ",
    "ResidualVQ",
    "SimVQ",
    "VectorQuantizer",
    "usage_stats",
]
