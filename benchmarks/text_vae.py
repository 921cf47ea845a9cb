"""Step time and peak memory of the text VAE's training step against a plain LoRA step of the
base LM (forward + backward of the span's next-token loss, one adapter), same batch, same
process. Prints the ratio (the issue's target: the VAE step at most 2.5x).

    python benchmarks/text_vae.py                      # SmolLM2-135M, 4 spans of 32 tokens
    python benchmarks/text_vae.py --batch 8 --steps 5 --threads 2
    python benchmarks/text_vae.py --inject prefix         # the latent as prefix embeddings
    python benchmarks/text_vae.py --pooling queries --align none   # the preset before
    python benchmarks/text_vae.py --find-batch                  # on a GPU: the largest batch

The defaults are the preset's layout (configs/text_vae.yaml): memory injection, chunk pooling,
aligned slots at the inputs and the logits. On a GPU the frozen base is bfloat16 and the adapters
and heads float32, as in training (``text.lm_dtype=auto``).

``--find-batch`` doubles the batch until a VAE step runs out of memory (or passes
``--max-batch``), then bisects: it prints the largest batch that fits, its tokens/s and the peak
memory of one step, and that peak per billion parameters of the base, the journal's question
(how much memory does this design need per billion parameters). On a CPU running out of memory
kills the process rather than raising, so there the search stops at ``--max-batch``.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

from pips.config import ModelConfig, QuantizerConfig
from pips.models.text_vae import ALIGNS, TextVAE, load_causal_lm


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux)


def largest_fitting(fits, limit: int) -> int:
    """The largest batch n in [1, limit] with ``fits(n)``, for a ``fits`` that is true up to some
    size and false above it: double from 1 until it fails or passes ``limit``, then bisect
    between the last size that fit and the first that did not. 0 when not even 1 fits."""
    good, bad = 0, limit + 1
    n = 1
    while n <= limit:
        if not fits(n):
            bad = n
            break
        good, n = n, n * 2
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def timed(step, steps: int, device: torch.device) -> float:
    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--span", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--inject", default="memory", choices=["prefix", "memory"])
    parser.add_argument("--pooling", default="chunks", choices=["queries", "chunks"])
    parser.add_argument("--align", default="both", choices=list(ALIGNS))
    parser.add_argument("--find-batch", action="store_true", help="search the largest batch")
    parser.add_argument("--max-batch", type=int, default=None, help="(default: 4096 GPU, 64 CPU)")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    start = time.perf_counter()
    lm = load_causal_lm(arguments.lm, dtype)
    load_seconds = time.perf_counter() - start
    model = ModelConfig(
        layout="pooled",
        width=128,
        heads=4,
        num_latents=8,
        quantizer=QuantizerConfig(kind="fsq", levels=[8, 5, 5, 5], dim=4),
    )
    vae = TextVAE(
        lm,
        model,
        lora_rank=arguments.rank,
        inject=arguments.inject,
        latent_norm=True,
        pooling=arguments.pooling,
        align=arguments.align,
        span_tokens=arguments.span,
    ).to(device)
    optimizer = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    vocab = min(1000, vae.vocab_size)
    tokens = torch.randint(1, vocab, (arguments.batch, arguments.span), generator=generator)
    tokens = tokens.to(device)

    def plain_step():  # the base with the decoder adapter only: next-token loss of the span
        vae.use_adapter("decoder")
        logits = vae.lm(input_ids=tokens).logits[:, :-1]
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def vae_step(tokens=tokens):
        logits = vae(tokens).token_logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    plain = timed(plain_step, arguments.steps, device)
    plain_memory = peak_mb(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = timed(vae_step, arguments.steps, device)
    vae_memory = peak_mb(device)
    tokens_per_step = arguments.batch * arguments.span
    print(
        f"{arguments.lm} on {device} ({dtype}), {arguments.threads} thread(s): loaded in {load_seconds:.1f} s; {vae.describe_trainable()}"
    )
    print(
        f"batch {arguments.batch} x {arguments.span} tokens, latent injected as {arguments.inject}, "
        f"{arguments.pooling} pooling, aligned slots {arguments.align}, mean of {arguments.steps} steps"
    )
    print(
        f"  LoRA step of the base LM: {plain:.3f} s ({tokens_per_step / plain:.0f} tokens/s), peak {plain_memory:.0f} MB"
    )
    print(
        f"  text VAE step:            {step:.3f} s ({tokens_per_step / step:.0f} tokens/s), peak {vae_memory:.0f} MB"
    )
    print(f"  ratio {step / plain:.2f}x (target: at most 2.5x)")
    if device.type == "cpu":
        print("  (CPU peak memory is the process's peak RSS, so the second includes the first)")
    if arguments.find_batch:
        find_batch(vae, vae_step, arguments, device, vocab)


def find_batch(vae, vae_step, arguments, device: torch.device, vocab: int) -> None:
    """The largest batch a VAE step fits in, and what one step of it costs."""
    limit = arguments.max_batch or (4096 if device.type == "cuda" else 64)
    generator = torch.Generator().manual_seed(1)

    def batch_of(n: int) -> torch.Tensor:
        return torch.randint(1, vocab, (n, arguments.span), generator=generator).to(device)

    def fits(n: int) -> bool:
        try:
            vae_step(batch_of(n))
            if device.type == "cuda":
                torch.cuda.synchronize()
            ok = True
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not out_of_memory(error):
                raise
            ok = False
        vae.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  batch {n}: {'fits' if ok else 'out of memory'}", flush=True)
        return ok

    largest = largest_fitting(fits, limit)
    if largest == 0:
        print("  not even a batch of 1 fits")
        return
    tokens = batch_of(largest)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(lambda: vae_step(tokens), arguments.steps, device)
    peak = peak_mb(device)
    base = sum(p.numel() for n, p in vae.lm.named_parameters() if "lora_" not in n)
    capped = " (the --max-batch cap)" if largest == limit else ""
    print(
        f"largest batch that fits: {largest}{capped} x {arguments.span} tokens: {seconds:.3f} s "
        f"a step, {largest * arguments.span / seconds:.0f} tokens/s, peak {peak:.0f} MB in one "
        f"step = {peak / 1024 / (base / 1e9):.1f} GiB per billion base parameters "
        f"({base / 1e6:.1f}M base parameters)"
    )
    if device.type == "cpu":
        print("  (on a CPU that peak is the process's RSS, the interpreter and libraries included)")


if __name__ == "__main__":
    main()
