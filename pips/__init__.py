"""PIPS: learn discrete codes of structured data (ARC grids, images, sequences).

``pips.load(run)`` gives a trained run's :class:`~pips.evaluation.tokenizer.Tokenizer`
(``encode`` / ``decode``); the library parts live in ``pips.quantizers``, ``pips.losses``,
``pips.nn`` and ``pips.data``, each usable without the runner.
"""

__version__ = "0.1.0"


def load(path, device="cpu", which: str = "best"):
    """A trained run folder or ``.ckpt`` -> its Tokenizer: ``tok.encode(items)``,
    ``tok.decode(codes)``, ``tok.config``, ``tok.codebook_size``, ``tok.bits_per_item``."""
    # imported here, not at the top: `import pips.quantizers` stays free of Lightning
    from pips.evaluation.tokenizer import load as load_tokenizer

    return load_tokenizer(path, device, which)
