"""The text task through the ordinary runner: a tiny random Llama and a byte tokenizer written to
a local folder (text.lm), trained a few steps on pydoc spans, stopped, resumed, evaluated."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")


def invoke(*arguments):
    from typer.testing import CliRunner

    from pips.cli import app

    return CliRunner().invoke(app, [str(a) for a in arguments])


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A folder with a randomly initialised tiny Llama and a byte-level tokenizer (no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_lm")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.3,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def common(lm):
    return [
        "task=text",
        f"text.lm={lm}",
        "text.span_tokens=16",
        "text.lora_rank=4",
        "model.layout=pooled",
        "model.size_from=heads",
        "model.width=32",
        "model.heads=2",
        "model.num_latents=4",
        "model.quantizer.kind=fsq",
        "model.quantizer.levels=[8,5,5,5]",
        "data.batch_size=4",
        "data.val_batch_size=8",
        "data.max_samples=64",
        "data.max_val_samples=16",
        "data.max_final_val_samples=16",
        "trainer.max_steps=6",
        "trainer.val_every=3",
        "trainer.log_every=2",
        "trainer.image_every=0",
        "trainer.progress=false",
        "trainer.threads=1",
        "optim.lr.start=3e-3",
    ]


def test_the_text_task_trains_resumes_and_evaluates_through_the_runner(tiny_lm, tmp_path):
    root = f"run_root={tmp_path}"
    straight = invoke("train", *common(tiny_lm), root, "name=straight")
    assert straight.exit_code == 0, straight.output
    assert "trainable" in straight.output
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    for key in ("codes_bits_carried", "nll_bits", "lm_nll_bits", "token_accuracy"):
        assert key in summary, summary
    assert summary["capacity_bits"] == pytest.approx(4 * math.log2(1000))  # 4 slots of 1000 codes
    assert summary["codebook_perplexity"] >= 1

    checkpoint = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    state = checkpoint["state_dict"]
    assert not [k for k in state if ".lm." in k and "lora_" not in k]  # no frozen base weights

    stopped = invoke("train", *common(tiny_lm), root, "name=stopped", "trainer.stop_at_step=3")
    assert stopped.exit_code == 0, stopped.output
    resumed = invoke("resume", tmp_path / "stopped", "trainer.stop_at_step=null")
    assert resumed.exit_code == 0, resumed.output
    other = torch.load(tmp_path / "stopped" / "checkpoints" / "last.ckpt", weights_only=True)
    assert other["global_step"] == checkpoint["global_step"] == 6
    for key in state:
        torch.testing.assert_close(state[key], other["state_dict"][key], rtol=0, atol=0, msg=key)

    evaluated = invoke("evaluate", tmp_path / "straight", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.output)["metrics"]
    assert metrics["nll_bits"] == pytest.approx(summary["nll_bits"], rel=1e-4)

    exported = tmp_path / "text.safetensors"
    assert invoke("export", tmp_path / "straight", "--out", exported).exit_code == 0
    from safetensors import safe_open

    with safe_open(exported, "pt") as file:
        names = list(file.keys())
    assert names and not [k for k in names if "lm." in k and "lora_" not in k]  # no base weights
    from_file = invoke("evaluate", exported, "--json")
    assert from_file.exit_code == 0, from_file.output
    assert json.loads(from_file.output)["metrics"]["nll_bits"] == pytest.approx(
        summary["nll_bits"], rel=1e-4
    )

    generated = invoke("generate", tmp_path / "straight", "--text", "x" * 20 + "abc")
    assert generated.exit_code == 0, generated.output
    assert generated.output.count("decoded:") == 2  # 23 bytes: a 16-token span and a 7-token one
    sampled = invoke("generate", tmp_path / "straight", "--text", "hello", "--temperature", "1")
    assert sampled.exit_code == 0 and "decoded:" in sampled.output

    codes = tmp_path / "codes.npz"
    assert invoke("encode", tmp_path / "straight", "--out", codes).exit_code == 0
    decoded = invoke("decode", tmp_path / "straight", codes, "--out", tmp_path / "spans.npz")
    assert decoded.exit_code == 0, decoded.output
    as_text = invoke("decode", tmp_path / "straight", codes, "--out", tmp_path / "spans.jsonl")
    assert as_text.exit_code == 0, as_text.output
    lines = [json.loads(line) for line in (tmp_path / "spans.jsonl").read_text().splitlines()]
    assert len(lines) == 16 and all(isinstance(line["text"], str) for line in lines)
    from_codes = invoke("generate", tmp_path / "straight", "--codes", codes)
    assert from_codes.exit_code == 0, from_codes.output
    assert from_codes.output.count("span ") == 16
    # the greedy decoding of a span's codes is what decode writes for it
    first = from_codes.output.splitlines()[0].split(": ", 1)[1]
    assert first == repr(lines[0]["text"])
    report = invoke("report", tmp_path / "straight")
    assert report.exit_code == 0, report.output
    page = (tmp_path / "straight" / "report.html").read_text()
    assert "Spans and their reconstructions" in page and page.count("<tr>") >= 12
    neither = invoke("generate", tmp_path / "straight")
    assert neither.exit_code == 2 and "--codes" in neither.output
    walk = invoke("generate", tmp_path / "straight", "--interpolate", "abc", "def")
    assert walk.exit_code == 2 and "gaussian" in walk.output  # discrete codes: no walk


def test_checkpointing_with_memory_injection_is_refused_and_with_a_prefix_trains(tiny_lm, tmp_path):
    arguments = [*common(tiny_lm), "text.gradient_checkpointing=true", "trainer.max_steps=2"]
    refused = invoke("train", *arguments, "text.inject=memory", f"run_root={tmp_path}", "name=m")
    assert refused.exit_code == 2 and "text.inject=prefix" in refused.output
    assert not (tmp_path / "m").exists()
    trained = invoke("train", *arguments, f"run_root={tmp_path}", "name=p")
    assert trained.exit_code == 0, trained.output


def test_a_missing_lm_folder_is_one_sentence(tmp_path):
    result = invoke("train", *common(tmp_path / "no_lm"), f"run_root={tmp_path}", "name=x")
    assert result.exit_code == 2, result.output
    assert "config.json" in result.output and not (tmp_path / "x").exists()


def test_overlap_mode_and_a_gaussian_latent_train_through_the_runner(tiny_lm, tmp_path):
    arguments = [*common(tiny_lm), "text.mode=overlap", "text.latent=gaussian"]
    arguments += ["text.free_bits=0.5", "text.kl_weight=0.1", "trainer.max_steps=2"]
    result = invoke("train", *arguments, f"run_root={tmp_path}", "name=g")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert summary["capacity_bits"] > 0  # a Gaussian's capacity is its KL
    assert "codes_bits_carried" in summary
    walk = invoke("generate", tmp_path / "g", "--interpolate", "abc", "xyz", "--steps", "3")
    assert walk.exit_code == 2 and "overlap" in walk.output  # spans decoded alone only
    arguments = [a for a in arguments if a != "text.mode=overlap"]
    assert invoke("train", *arguments, f"run_root={tmp_path}", "name=h").exit_code == 0
    walk = invoke("generate", tmp_path / "h", "--interpolate", "abc", "xyz", "--steps", "3")
    assert walk.exit_code == 0, walk.output
    assert [line.split(":")[0] for line in walk.output.splitlines()] == [
        "t=0.00",
        "t=0.50",
        "t=1.00",
    ]


def test_a_prior_over_text_codes_reports_bits_per_span_beside_the_lms_own(tiny_lm, tmp_path):
    root = f"run_root={tmp_path}"
    assert invoke("train", *common(tiny_lm), root, "name=vae").exit_code == 0
    prior = [
        "task=prior",
        f"prior.tokenizer={tmp_path / 'vae'}",
        "prior.width=32",
        "prior.depth=1",
        "prior.heads=2",
        "data.batch_size=8",
        "data.max_final_val_samples=16",
        "trainer.max_steps=4",
        "trainer.val_every=2",
        "trainer.progress=false",
        "trainer.threads=1",
    ]
    result = invoke("train", *prior, root, "name=prior")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "prior" / "summary.json").read_text())
    # a two-part code: the prior's bits for the codes plus the decoder's for the span given them
    assert summary["codelength_bits"] == pytest.approx(
        summary["prior_bits"] + summary["decoder_bits"], rel=1e-6
    )
    assert 0 < summary["prior_bits"] and summary["uniform_code_bits"] == pytest.approx(
        4 * math.log2(1000)  # 4 slots of 1,000 FSQ codes
    )
    # the frozen LM on the same 16 spans, as the validation of the VAE measured it
    vae = json.loads((tmp_path / "vae" / "summary.json").read_text())
    assert summary["val_lm_bits"] == pytest.approx(vae["lm_nll_bits"], rel=1e-3)
    for key in ("zlib_bits", "xz_bits", "order0_bits"):
        assert summary[f"val_{key}"] > 0
    sampled = invoke("sample", tmp_path / "prior", "-n", "3", "--out", tmp_path / "samples")
    assert sampled.exit_code == 0, sampled.output
    lines = (tmp_path / "samples" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all("text" in json.loads(line) for line in lines)


def test_latent_first_keeps_the_decoder_adapter_at_zero_through_the_runner(tiny_lm, tmp_path):
    levers = ["text.inject=memory", "text.latent_norm=true", "model.quantizer.dim=4"]
    arguments = [*common(tiny_lm), *levers, "text.decoder_warmup=100", "text.word_dropout=0.3"]
    result = invoke("train", *arguments, f"run_root={tmp_path}", "name=first")
    assert result.exit_code == 0, result.output
    state = torch.load(tmp_path / "first" / "checkpoints" / "last.ckpt", weights_only=True)
    state = state["state_dict"]
    decoder = [v for k, v in state.items() if "lora_B.decoder" in k]
    encoder = [v for k, v in state.items() if "lora_B.encoder" in k]
    assert decoder and all(torch.count_nonzero(v) == 0 for v in decoder)  # never trained
    assert any(torch.count_nonzero(v) > 0 for v in encoder)
    assert any("memory.out" in k for k in state) and any("latent_norm" in k for k in state)
    summary = json.loads((tmp_path / "first" / "summary.json").read_text())
    assert summary["codebook_perplexity"] > 1  # the norm keeps the codes from one value
