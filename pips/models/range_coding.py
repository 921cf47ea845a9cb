"""Token strings to bits and back with a prior: ``constriction``'s range coder (a queue: decoded
in the order encoded), one categorical model per token from the prior's next-token distribution.

Encoder and decoder walk the same :class:`~pips.models.prior.Decoding` (batch 1, KV cache) and feed
it the same tokens, so they compute bit-identical probabilities, the condition of an exact round
trip. Each token is coded within the one field its layout allows there (so no probability is
spent on ids that cannot occur); forced tokens (a field of one id: the end token) cost nothing and
are not coded at all. The coder's length tracks ``-log2 p`` of the prior up to the range coder's
fixed-point precision and its final word.
"""

from __future__ import annotations

import constriction
import numpy as np
import torch

from pips.models.prior import CodePrior


def _field(decoding) -> tuple[int, np.ndarray]:
    """The allowed field's first id and its probabilities (float64) at the next position."""
    logits = decoding.next_logits()[0]  # [V], -inf outside the field
    allowed = torch.isfinite(logits).nonzero()[:, 0]
    low, high = int(allowed[0]), int(allowed[-1]) + 1
    probs = torch.softmax(logits[low:high].double(), dim=-1).numpy()
    return low, probs


@torch.no_grad()
def compress(prior: CodePrior, items: list, condition=None) -> tuple[np.ndarray, float]:
    """Items' tokens (rows [T], padding after each end ignored) -> one stream of range-coder
    words (uint32) and the model's code length of them all in bits, ``-sum log2 p`` under the
    probabilities coded. One stream for many items (a task file's grids) spends the coder's
    final word once."""
    prior.eval()
    encoder, model_bits = constriction.stream.queue.RangeEncoder(), 0.0
    for item in items:
        tokens = torch.as_tensor(item, dtype=torch.long)
        length = int(prior.layout.lengths(tokens[None])[0])
        decoding = prior.start(1, length, condition)
        for position in range(length):
            low, probs = _field(decoding)
            symbol = int(tokens[position]) - low
            if not 0 <= symbol < len(probs):
                raise ValueError(
                    f"token {int(tokens[position])} at position {position} is not allowed there"
                )
            if len(probs) > 1:
                model = constriction.stream.model.Categorical(probs, perfect=False)
                encoder.encode(symbol, model)
                model_bits -= float(np.log2(probs[symbol]))
            decoding.push(tokens[position : position + 1])
    return encoder.get_compressed(), model_bits


@torch.no_grad()
def decompress(prior: CodePrior, compressed: np.ndarray, count: int, condition=None) -> list:
    """A stream of :func:`compress` and its item count -> the items' tokens, each [T], exactly
    those it took."""
    prior.eval()
    decoder = constriction.stream.queue.RangeDecoder(np.asarray(compressed, dtype=np.uint32))
    items = []
    for _ in range(count):
        decoding = prior.start(1, prior.layout.max_length, condition)
        while decoding.position < decoding.length and not decoding.complete():
            low, probs = _field(decoding)
            symbol = 0
            if len(probs) > 1:
                symbol = decoder.decode(constriction.stream.model.Categorical(probs, perfect=False))
            decoding.push(torch.tensor([low + int(symbol)]))
        items.append(decoding.seen[0].clone())
    return items
