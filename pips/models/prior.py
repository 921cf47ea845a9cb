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

A whole sequence of several items with separators (task ``prior`` with ``prior.context=task``:
an ARC task's grids) is scored by :meth:`CodePrior.sequence_log_probs`, which takes every
input's coordinates and every target's allowed range ``[low, high)`` precomputed, so it needs no
layout logic of its own. Decoding after such a sequence (the test output given its task) gives
the condition its own coordinates (``condition_coordinates``: the place of each condition token
in its item, 0 for separators), exactly as the sequence path does.

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

    # ------------------------------------------------------------------ sequences of items
    def sequence_logits(
        self,
        inputs: torch.Tensor,
        coordinates: torch.Tensor | None,
        low: torch.Tensor,
        high: torch.Tensor,
    ) -> torch.Tensor:
        """Teacher-forced logits [B, L, V] of a batch of sequences given precomputed fields:
        ``inputs`` [B, L] (``BOS`` first, then the sequence's ids, separators ``V + 1 + i``
        among them, right-padded), ``coordinates`` [B, L, 3] of the token each input predicts
        (ignored without coordinates), and the ids ``low <= id < high`` [B, L] allowed at each
        target; every other id is -inf."""
        logits = self(inputs, coordinates=coordinates if self.coordinates else None)
        ids = torch.arange(self.vocab_size, device=logits.device)
        keep = (ids >= low[..., None]) & (ids < high[..., None])  # [B, L, V]
        return logits.masked_fill(~keep, -math.inf)

    def sequence_log_probs(
        self,
        inputs: torch.Tensor,
        coordinates: torch.Tensor | None,
        low: torch.Tensor,
        high: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        """``log p(target_t | inputs_<=t)`` in nats [B, L] under :meth:`sequence_logits`;
        ``targets`` are ids in ``[0, V)`` (-inf where outside ``[low, high)``). Positions that
        carry no loss (separators, padding) need only a target inside their range."""
        log_probs = self.sequence_logits(inputs, coordinates, low, high).log_softmax(-1)
        return log_probs.gather(-1, targets[..., None])[..., 0]

    # ------------------------------------------------------------------ token by token
    def start(
        self,
        batch: int,
        length: int | None = None,
        condition: torch.Tensor | None = None,
        guidance: float | None = None,
        cache: bool = True,
        condition_coordinates: torch.Tensor | None = None,
        unconditional: torch.Tensor | None = None,
        unconditional_coordinates: torch.Tensor | None = None,
    ) -> Decoding:
        return Decoding(
            self,
            batch,
            length or self.layout.max_length,
            condition,
            guidance,
            cache,
            condition_coordinates,
            unconditional,
            unconditional_coordinates,
        )

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
        condition_coordinates: torch.Tensor | None = None,
        unconditional: torch.Tensor | None = None,
        unconditional_coordinates: torch.Tensor | None = None,
    ):
        """``n`` token strings [n, T] (T: until every row is a whole item, padded after its
        end); with ``return_logits`` also the (masked, guided, unfiltered) logits [n, T, V] each
        token was drawn from. The condition options are :class:`Decoding`'s."""
        decoding = self.start(
            n,
            length,
            condition,
            guidance,
            cache,
            condition_coordinates,
            unconditional,
            unconditional_coordinates,
        )
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
    ``[BOS, condition]`` and, with ``guidance = s``, a second stream ``[BOS, unconditional]``
    (default ``[BOS]``), mixed as ``uncond + s * (cond - uncond)`` (classifier-free guidance)
    before the layout's mask.

    ``condition_coordinates`` [Lc, 3] or [B, Lc, 3]: the coordinates of each condition token
    (its place in its item, 0 for separators), carried by the input before it, as
    :meth:`CodePrior.sequence_logits` has them; None: all 0 (the inputs of the prefix predict
    no item token). ``unconditional_coordinates`` are the second stream's.
    """

    def __init__(
        self,
        prior: CodePrior,
        batch,
        length,
        condition,
        guidance,
        cache: bool,
        condition_coordinates=None,
        unconditional=None,
        unconditional_coordinates=None,
    ):
        if guidance is not None and condition is None:
            raise ValueError(
                "guidance mixes conditional and unconditional logits: give a condition"
            )
        if guidance is None and unconditional is not None:
            raise ValueError("an unconditional prefix is the second stream of guidance")
        self.prior, self.length, self.guidance, self.cached = prior, length, guidance, cache
        device = prior.head.weight.device
        self.tokens = torch.zeros(batch, length, dtype=torch.long, device=device)
        self.position = 0
        streams = [(condition, condition_coordinates)]
        if guidance is not None:
            streams.append((unconditional, unconditional_coordinates))
        self.prefixes = [prior.prefix(batch, c, device) for c, _ in streams]
        self.leads = [
            self._lead(p, coordinates)
            for p, (_, coordinates) in zip(self.prefixes, streams, strict=True)
        ]
        self.caches = [
            prior.new_cache(batch, p.shape[1] + length) if cache else None for p in self.prefixes
        ]
        with torch.no_grad():  # the prefix's last input predicts item position 0
            self.stream_logits = [
                prior(p, c, self._coordinates(index))[:, -1]
                for index, (p, c) in enumerate(zip(self.prefixes, self.caches, strict=True))
            ]

    def _lead(self, prefix: torch.Tensor, coordinates) -> torch.Tensor | None:
        """The coordinates [B, Lc, 3] that the prefix's inputs before the last one carry."""
        if not self.prior.coordinates:
            return None
        batch, lead = prefix.shape[0], prefix.shape[1] - 1
        if coordinates is None:
            return torch.zeros(batch, lead, 3, dtype=torch.long, device=prefix.device)
        coordinates = torch.as_tensor(coordinates, dtype=torch.long, device=prefix.device)
        if coordinates.dim() == 2:
            coordinates = coordinates.expand(batch, -1, -1)
        if coordinates.shape[:2] != (batch, lead) or coordinates.shape[-1] != 3:
            raise ValueError(
                f"condition coordinates must be [{lead}, 3] or [{batch}, {lead}, 3] (one row of "
                f"(row, column, part) per condition token); got {list(coordinates.shape)}"
            )
        return coordinates

    def _coordinates(self, stream: int, every: bool = False) -> torch.Tensor | None:
        """Coordinates of a stream's prefix inputs, then of the input predicting the current
        position (``every``: of the inputs predicting each position so far and the current)."""
        device = self.tokens.device
        if every:
            positions = torch.arange(self.position + 1, device=device)
        else:
            positions = torch.tensor([self.position], device=device)
        coordinates = self.prior.input_coordinates(self.seen, positions)
        if coordinates is None:
            return None
        return torch.cat([self.leads[stream], coordinates], 1)

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
            positions = torch.tensor([self.position], device=token.device)
            coordinates = self.prior.input_coordinates(self.seen, positions)
            self.stream_logits = [
                self.prior(token[:, None], c, coordinates)[:, -1] for c in self.caches
            ]
        else:
            self.stream_logits = [
                self.prior(torch.cat([p, self.seen], 1), None, self._coordinates(index, True))[
                    :, -1
                ]
                for index, p in enumerate(self.prefixes)
            ]


def bits_per_token(prior: CodePrior, tokens: torch.Tensor) -> torch.Tensor:
    """The teacher-forced training loss: bits per real token over the batch (scalar)."""
    return prior.bits(tokens).sum() / prior.layout.lengths(tokens).sum()
