"""A prior over code strings: a decoder-only causal transformer (RMSNorm, SwiGLU, 1D RoPE) that
gives ``p(tokens) = prod_t p(token_t | BOS, condition, tokens_<t)``.

Inputs are the layout's token ids ``[0, V)``, ``BOS = V`` and, for conditions only, ``V + 1 +
i`` for ``i < condition_vocab`` (separators); the head predicts ``[0, V)``. A
:class:`~pips.models.code_tokens.CodeLayout` masks the logits to the one field allowed at each
position, so the code length of a prior with uniform logits is the code string's capacity.

With ``coordinates`` (the default) each input also gets learned embeddings of the layout's 2D
coordinates (:meth:`~pips.models.code_tokens.CodeLayout.coordinates`: row, column, part) of the
token it PREDICTS: the input at item position ``t`` (token ``t - 1``, or the last prefix token at
``t = 0``) carries position ``t``'s coordinates. They depend only on the size tokens (positions 0
and 1), which every later input has already seen, so nothing leaks from the target; the inputs of
the ``[BOS, condition]`` prefix before the last one get coordinates 0. The teacher-forced
:meth:`CodePrior.logits`, the cached and the uncached :class:`Decoding` add the same embeddings.

Every caller that decodes token by token (sampling, the range coder, the benchmark) goes through
one :class:`Decoding`: a prefill of ``[BOS, condition]`` into a preallocated per-layer
:class:`~pips.nn.transformer.KVCache`, then one token per step; ``cache=False`` recomputes the
whole prefix each step instead (the reference the cache is tested and timed against). One filter,
:func:`filter_logits` (temperature, top-k, top-p), serves every sampling path.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pips.models.code_tokens import CodeLayout
from pips.nn.rope import Rope1D
from pips.nn.transformer import Block, KVCache, init_weights


def filter_logits(
    logits: torch.Tensor,  # [B, V]
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Logits to sample from: divided by ``temperature``, then all but the ``top_k`` largest
    (ties at the k-th kept) and all outside the smallest set of mass >= ``top_p`` set to -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax); got {temperature}")
    logits = logits / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1; got {top_k}")
        if top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[..., -1:]  # [B, 1]
            logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the first token always stays
        remove = (mass_before >= top_p).scatter(-1, order, mass_before >= top_p)
        logits = logits.masked_fill(remove, -math.inf)
    return logits


class CodePrior(nn.Module):
    """Causal transformer over a layout's tokens; see the module docstring for the ids."""

    def __init__(
        self,
        layout: CodeLayout,
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp: str = "swiglu",
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        rope_base: float = 10_000.0,
        condition_vocab: int = 0,
        coordinates: bool = True,
    ):
        super().__init__()
        # the constructor's arguments but the layout: what a saved prior records to rebuild it
        self.args = dict(
            width=width,
            depth=depth,
            heads=heads,
            mlp=mlp,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            rope_base=rope_base,
            condition_vocab=condition_vocab,
            coordinates=coordinates,
        )
        self.layout = layout
        self.coordinates = coordinates
        self.vocab_size = layout.vocab_size
        self.bos_id = self.vocab_size
        self.heads, self.head_dim = heads, width // heads
        self.embed = nn.Embedding(self.vocab_size + 1 + condition_vocab, width)
        self.rope = Rope1D(self.head_dim, rope_base)
        if coordinates:  # row, column, part; index 0: not a code token
            self.coordinate_embed = nn.ModuleList(
                nn.Embedding(size, width) for size in layout.coordinate_sizes
            )
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp, mlp_ratio, dropout) for _ in range(depth)
        )
        self.norm = nn.RMSNorm(width)
        self.head = nn.Linear(width, self.vocab_size, bias=False)
        init_weights(self, depth)

    # ------------------------------------------------------------------ full sequences
    def new_cache(self, batch: int, capacity: int) -> list[KVCache]:
        like = self.head.weight
        return [
            KVCache.empty(batch, self.heads, capacity, self.head_dim, like) for _ in self.blocks
        ]

    def forward(
        self,
        inputs: torch.Tensor,
        cache: list[KVCache] | None = None,
        coordinates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """inputs [B, L] -> unmasked next-token logits [B, L, V]; with a cache, the inputs sit at
        the cache's positions and are appended to it. ``coordinates`` [B, L, 3] (what
        :meth:`input_coordinates` gives; required when the prior uses coordinates) are embedded
        and added to the inputs' embeddings."""
        start = 0 if cache is None else cache[0].length
        positions = torch.arange(start, start + inputs.shape[1], device=inputs.device)
        rope = self.rope(positions)  # cos, sin [1, 1, L, hd/2]
        x = self.embed(inputs)  # [B, L, D]
        if self.coordinates:
            if coordinates is None:
                raise ValueError("this prior uses coordinates: give the inputs' coordinates")
            for axis, embed in enumerate(self.coordinate_embed):
                x = x + embed(coordinates[..., axis])
        for index, block in enumerate(self.blocks):
            x = block(x, rope, causal=True, cache=None if cache is None else cache[index])
        return self.head(self.norm(x))  # [B, L, V]

    def prefix(self, batch: int, condition: torch.Tensor | None, device) -> torch.Tensor:
        """[BOS, condition...] for each row [B, 1 + Lc]; ``condition`` is [Lc] or [B, Lc]."""
        bos = torch.full((batch, 1), self.bos_id, dtype=torch.long, device=device)
        if condition is None:
            return bos
        condition = torch.as_tensor(condition, dtype=torch.long, device=device)
        return torch.cat(
            [bos, condition.expand(batch, -1) if condition.dim() == 1 else condition], 1
        )

    def input_coordinates(
        self, tokens: torch.Tensor, positions: torch.Tensor, lead: int = 0
    ) -> torch.Tensor | None:
        """Coordinates [B, lead + T, 3] of a run of inputs: ``lead`` prefix inputs that predict no
        item token (0), then the inputs that predict item ``positions`` [T] of the items that
        ``tokens`` [B, P] begin (the tokens before them); ``None`` without coordinates."""
        if not self.coordinates:
            return None
        coords = self.layout.coordinates(tokens, positions)  # [B, T, 3]
        return torch.nn.functional.pad(coords, (0, 0, lead, 0))

    def mask(self, logits: torch.Tensor, prefix: torch.Tensor, positions: torch.Tensor):
        """logits [B, T, V] at ``positions`` [T] of the item (given its tokens ``prefix``) with
        every id the layout does not allow there set to -inf."""
        low, high = self.layout.allowed(prefix, positions)  # [B, T]
        ids = torch.arange(self.vocab_size, device=logits.device)
        keep = (ids >= low[..., None]) & (ids < high[..., None])  # [B, T, V]
        return logits.masked_fill(~keep, -math.inf)

    def logits(self, tokens: torch.Tensor, condition: torch.Tensor | None = None):
        """Teacher-forced, masked logits of every token of ``tokens`` [B, T] -> [B, T, V]."""
        prefix = self.prefix(tokens.shape[0], condition, tokens.device)
        inputs = torch.cat([prefix, tokens[:, :-1]], dim=1)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        coordinates = self.input_coordinates(tokens, positions, prefix.shape[1] - 1)
        logits = self(inputs, coordinates=coordinates)[:, prefix.shape[1] - 1 :]  # [B, T, V]
        return self.mask(logits, tokens, positions)

    def log_prob(self, tokens: torch.Tensor, condition: torch.Tensor | None = None):
        """``log p(tokens)`` in nats per row [B], over the real tokens (padding is forced)."""
        log_probs = self.logits(tokens, condition).log_softmax(-1)
        per_token = log_probs.gather(-1, tokens[..., None])[..., 0]  # [B, T]
        real = (
            torch.arange(tokens.shape[1], device=tokens.device)
            < self.layout.lengths(tokens)[:, None]
        )
        return (per_token * real).sum(-1)

    def bits(self, tokens: torch.Tensor, condition: torch.Tensor | None = None):
        """Code length ``-log2 p(tokens)`` per row [B]."""
        return -self.log_prob(tokens, condition) / math.log(2)

    # ------------------------------------------------------------------ token by token
    def start(
        self,
        batch: int,
        length: int | None = None,
        condition: torch.Tensor | None = None,
        guidance: float | None = None,
        cache: bool = True,
    ) -> Decoding:
        return Decoding(self, batch, length or self.layout.max_length, condition, guidance, cache)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        condition: torch.Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
        greedy: bool = False,
        length: int | None = None,
        cache: bool = True,
        return_logits: bool = False,
    ):
        """``n`` token strings [n, T] (T: until every row is a whole item, padded after its
        end); with ``return_logits`` also the (masked, guided, unfiltered) logits [n, T, V] each
        token was drawn from."""
        decoding = self.start(n, length, condition, guidance, cache)
        steps = []
        while decoding.position < decoding.length and not decoding.complete():
            logits = decoding.next_logits()  # [n, V]
            if return_logits:
                steps.append(logits)
            if greedy:
                token = logits.argmax(-1)
            else:
                probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
                token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            decoding.push(token)
        tokens = decoding.seen
        return (tokens, torch.stack(steps, 1)) if return_logits else tokens


class Decoding:
    """Next-token logits of a batch, one pushed token at a time: the conditional stream
    ``[BOS, condition]`` and, with ``guidance = s``, the unconditional ``[BOS]``, mixed as
    ``uncond + s * (cond - uncond)`` (classifier-free guidance) before the layout's mask."""

    def __init__(self, prior: CodePrior, batch, length, condition, guidance, cache: bool):
        if guidance is not None and condition is None:
            raise ValueError(
                "guidance mixes conditional and unconditional logits: give a condition"
            )
        self.prior, self.length, self.guidance, self.cached = prior, length, guidance, cache
        device = prior.head.weight.device
        self.tokens = torch.zeros(batch, length, dtype=torch.long, device=device)
        self.position = 0
        prefixes = [prior.prefix(batch, condition, device)]
        if guidance is not None:
            prefixes.append(prior.prefix(batch, None, device))
        self.prefixes = prefixes
        self.caches = [
            prior.new_cache(batch, p.shape[1] + length) if cache else None for p in prefixes
        ]
        with torch.no_grad():  # the prefix's last input predicts item position 0
            self.stream_logits = [
                prior(p, c, self._coordinates(p.shape[1] - 1))[:, -1]
                for p, c in zip(prefixes, self.caches, strict=True)
            ]

    def _coordinates(self, lead: int, every: bool = False) -> torch.Tensor | None:
        """Coordinates of ``lead`` prefix inputs, then of the input predicting the current
        position (``every``: of the inputs predicting each position so far and the current)."""
        device = self.tokens.device
        if every:
            positions = torch.arange(self.position + 1, device=device)
        else:
            positions = torch.tensor([self.position], device=device)
        return self.prior.input_coordinates(self.seen, positions, lead)

    @property
    def seen(self) -> torch.Tensor:
        """The tokens pushed so far [B, position]."""
        return self.tokens[:, : self.position]

    def complete(self) -> bool:
        """Every row holds a whole item (what follows is forced padding)."""
        return bool(self.prior.layout.complete(self.seen).all())

    def next_logits(self) -> torch.Tensor:
        """Masked logits [B, V] of the token at the current position."""
        logits = self.stream_logits[0]
        if self.guidance is not None:
            unconditional = self.stream_logits[1]
            logits = unconditional + self.guidance * (logits - unconditional)
        positions = torch.tensor([self.position], device=logits.device)
        return self.prior.mask(logits[:, None], self.seen, positions)[:, 0]

    @torch.no_grad()
    def push(self, token: torch.Tensor) -> None:
        """Append ``token`` [B] and compute the next position's logits."""
        self.tokens[:, self.position] = token
        self.position += 1
        if self.position == self.length:
            return
        if self.cached:
            coordinates = self._coordinates(0)
            self.stream_logits = [
                self.prior(token[:, None], c, coordinates)[:, -1] for c in self.caches
            ]
        else:
            self.stream_logits = [
                self.prior(
                    torch.cat([p, self.seen], 1), None, self._coordinates(p.shape[1] - 1, True)
                )[:, -1]
                for p in self.prefixes
            ]


def bits_per_token(prior: CodePrior, tokens: torch.Tensor) -> torch.Tensor:
    """The teacher-forced training loss: bits per real token over the batch (scalar)."""
    return prior.bits(tokens).sum() / prior.layout.lengths(tokens).sum()
