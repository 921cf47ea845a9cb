"""Every codebook quantizer at its defaults, dropped into someone else's model, does not collapse.

The model is ``benchmarks/dropin.py``'s small conv autoencoder (two conv + max-pool layers of
unnormalised features, L1 + 10 x the quantizer loss, AdamW 3e-4) on sklearn's digits at 16x16,
trained here for 200 steps of 128 images. Measured (seeds 0-2) when this test was written:

    quantizer   used codes   val L1        with a unit-Gaussian codebook and no resets:
    vq          91-94%       0.084-0.087   vq: 0.4% (1 code), val L1 0.19-0.20
    rvq         90-93%       0.069-0.076
    gvq         87-92%       0.075-0.083
    simvq       71-80%       0.086-0.099
    product_vq  29-39%       0.088-0.096   (of the 16 x 16 = 256 product codes)

The thresholds leave room for other seeds and platforms, and sit far from a collapse.
"""

from __future__ import annotations

import pytest
import torch

THRESHOLDS = {  # kind: (least share of codes used, largest validation L1)
    "vq": (0.75, 0.11),
    "rvq": (0.75, 0.095),
    "gvq": (0.7, 0.10),
    "simvq": (0.5, 0.12),
    "product_vq": (0.2, 0.115),
}


@pytest.fixture(scope="module")
def dropin(load_benchmark):
    return load_benchmark("dropin")


SLOW = ("gvq", "simvq", "product_vq")  # ~4 s each on a free core; run with -m slow


@pytest.mark.parametrize(
    "kind",
    [pytest.param(kind, marks=pytest.mark.slow) if kind in SLOW else kind for kind in THRESHOLDS],
)
def test_default_quantizer_uses_its_codebook_in_a_small_conv_autoencoder(dropin, kind):
    torch.manual_seed(0)
    quantizer = dropin.pips_defaults()[kind]()
    result = dropin.train_dropin(quantizer, steps=200, batch_size=128, seed=0)
    least_usage, largest_l1 = THRESHOLDS[kind]
    assert result["usage"] >= least_usage, result
    assert result["val_l1"] <= largest_l1, result
