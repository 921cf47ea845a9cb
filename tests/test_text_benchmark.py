"""``benchmarks/text_vae.py``: the batch search behind ``--find-batch`` (against every threshold
by brute force), an out-of-memory error ending the search where a real one would, and the whole
script over a tiny Llama folder on the CPU."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("text_vae")


@pytest.mark.parametrize("limit", [1, 2, 7, 64, 100])
def test_the_search_finds_the_largest_size_that_fits_for_every_threshold(bench, limit):
    for threshold in range(0, limit + 5):  # sizes up to `threshold` fit
        tried = []

        def fits(n, threshold=threshold, tried=tried):
            tried.append(n)
            return n <= threshold

        assert bench.largest_fitting(fits, limit) == min(threshold, limit)
        assert all(1 <= n <= limit for n in tried)
        assert len(tried) == len(set(tried))  # never the same size twice
        assert len(tried) <= 2 * limit.bit_length() + 1  # doubling, then bisection


def test_an_out_of_memory_error_ends_the_search_and_other_errors_are_raised(bench, tiny_lm, capsys):
    from pips.config import ModelConfig, QuantizerConfig
    from pips.models.text_vae import TextVAE, load_causal_lm

    lm = load_causal_lm(str(tiny_lm))
    model = ModelConfig(
        layout="pooled",
        width=32,
        heads=2,
        num_latents=4,
        quantizer=QuantizerConfig(kind="fsq", levels=[8, 5, 5, 5], dim=4),
    )
    vae = TextVAE(lm, model, lora_rank=4, pooling="chunks", align="both", span_tokens=8)
    arguments = SimpleNamespace(max_batch=None, span=8, steps=1)
    seen = []

    def step(tokens):  # as a GPU would: more than 5 spans do not fit
        seen.append(tokens.shape)
        if tokens.shape[0] > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    bench.find_batch(vae, step, arguments, torch.device("cpu"), vocab=128)
    out = capsys.readouterr().out
    assert "batch 8: out of memory" in out
    assert "largest batch that fits: 5 x 8 tokens" in out
    assert "(the --max-batch cap)" not in out
    assert all(shape[1] == 8 for shape in seen)

    def broken(tokens):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        bench.find_batch(vae, broken, arguments, torch.device("cpu"), vocab=128)


def test_the_script_runs_over_a_local_lm_folder_and_finds_its_batch(
    bench, tiny_lm, monkeypatch, capsys
):
    argv = ["text_vae.py", "--lm", str(tiny_lm), "--batch", "2", "--span", "8", "--steps", "1"]
    monkeypatch.setattr(sys, "argv", argv + ["--rank", "4", "--find-batch", "--max-batch", "3"])
    bench.main()
    out = capsys.readouterr().out
    assert "ratio" in out and "tokens/s" in out
    assert "largest batch that fits: 3 (the --max-batch cap) x 8 tokens" in out
    assert "GiB per billion base parameters" in out
