"""The text task through the ordinary runner: a tiny random Llama and a byte tokenizer written to
a local folder (text.lm), trained a few steps on pydoc spans, stopped, resumed, evaluated."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")


def invoke(*arguments):
    from typer.testing import CliRunner

    from pips.cli import app

    return CliRunner().invoke(app, [str(a) for a in arguments])


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

    # the summary describes the final weights (a run folder evaluates its best checkpoint)
    evaluated = invoke("evaluate", tmp_path / "straight" / "checkpoints" / "last.ckpt", "--json")
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
    best = json.loads(invoke("evaluate", tmp_path / "straight", "--json").output)["metrics"]
    assert json.loads(from_file.output)["metrics"]["nll_bits"] == pytest.approx(
        best["nll_bits"], rel=1e-4
    )  # a run folder exports (and evaluates) its best checkpoint

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


def test_the_text_vae_preset_trains_with_chunk_pooling_and_aligned_slots(tiny_lm, tmp_path):
    preset = Path(__file__).resolve().parent.parent / "configs" / "text_vae.yaml"
    small = [f"text.lm={tiny_lm}", "text.span_tokens=16", "data.max_samples=32"]
    small += ["data.max_val_samples=8", "data.max_final_val_samples=8", "trainer.max_steps=2"]
    small += ["trainer.threads=1", "trainer.progress=false", f"run_root={tmp_path}", "name=p"]
    result = invoke("train", preset, *small)
    assert result.exit_code == 0, result.output
    config = (tmp_path / "p" / "config.yaml").read_text()
    assert "pooling: chunks" in config and "inject: memory" in config and "align: both" in config
    state = torch.load(tmp_path / "p" / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(key.startswith("model.aligned_outputs.") for key in state["state_dict"])
    evaluated = invoke("evaluate", tmp_path / "p", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    # 23 bytes of a byte-level tiny LM: a 16-token span, then a 7-token one (its slots spread
    # over 7 positions, as the encoder pooled them)
    generated = invoke("generate", tmp_path / "p", "--text", "x" * 20 + "abc")
    assert generated.exit_code == 0 and generated.output.count("decoded:") == 2, generated.output


def test_a_missing_lm_folder_is_one_sentence(tmp_path):
    result = invoke("train", *common(tmp_path / "no_lm"), f"run_root={tmp_path}", "name=x")
    assert result.exit_code == 2, result.output
    assert "config.json" in result.output and not (tmp_path / "x").exists()


def test_an_lm_folder_without_its_tokenizer_or_safetensors_is_one_sentence(tiny_lm, tmp_path):
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM.from_pretrained(tiny_lm)
    half = tmp_path / "no_tokenizer"
    half.mkdir()
    (half / "config.json").write_bytes((tiny_lm / "config.json").read_bytes())
    result = invoke("train", *common(half), f"run_root={tmp_path}", "name=x")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "cannot read its tokenizer from the folder" in result.output
    # weights only as a pickle: refused (reading one could run code), not loaded
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(lm.state_dict(), pickled / "pytorch_model.bin")
    for file in [tiny_lm / "config.json", *tiny_lm.glob("tokenizer*")]:
        (pickled / file.name).write_bytes(file.read_bytes())
    result = invoke("train", *common(pickled), f"run_root={tmp_path}", "name=y")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "cannot read the LM from the folder" in result.output and "safetensors" in result.output


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


def prior_arguments(tokenizer, *extra):
    """A small prior over the codes of the text run ``tokenizer``, a few steps."""
    return [
        "task=prior",
        f"prior.tokenizer={tokenizer}",
        "prior.width=32",
        "prior.depth=1",
        "prior.heads=2",
        "data.batch_size=8",
        "trainer.max_steps=4",
        "trainer.val_every=2",
        "trainer.progress=false",
        "trainer.threads=1",
        *extra,
    ]


def test_a_prior_over_text_codes_reports_bits_per_span_beside_the_lms_own(tiny_lm, tmp_path):
    root = f"run_root={tmp_path}"
    assert invoke("train", *common(tiny_lm), root, "name=vae").exit_code == 0
    prior = prior_arguments(tmp_path / "vae", "data.max_final_val_samples=16")
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
    arguments.append("text.bow_weight=0.5")
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
    header = (tmp_path / "first" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/loss_bow" in header  # the bag-of-words loss trains and is logged


def test_a_next_span_prior_scores_each_span_after_the_spans_before_it(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    from pips.config import load_config
    from pips.tasks.base import get_task

    root = f"run_root={tmp_path}"
    assert invoke("train", *common(tiny_lm), root, "name=vae").exit_code == 0
    prior = prior_arguments(
        tmp_path / "vae",
        "prior.document_spans=3",
        "data.max_final_val_samples=12",
    )
    preset = Path(__file__).resolve().parent.parent / "configs" / "text_next_span.yaml"
    result = invoke("train", preset, *prior, root, "name=next")  # the preset, made small
    assert result.exit_code == 0, result.output
    assert "consecutive spans" in result.output
    summary = json.loads((tmp_path / "next" / "summary.json").read_text())
    assert summary["codelength_bits"] == pytest.approx(
        summary["prior_bits"] + summary["decoder_bits"], rel=1e-6
    )
    assert summary["context_gain_bits"] == pytest.approx(
        summary["prior_bits_alone"] - summary["prior_bits"], abs=1e-6
    )
    # a slow reference of the LM's bits per span after the (at most 2) spans before it
    config = load_config(tmp_path / "vae" / "config.yaml", [])
    _, documents = get_task(config).prior_documents()
    lm = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    for key, before in (("lm_bits_in_context", 2), ("lm_bits_after_previous", 1)):
        bits, left = [], 12
        for document in documents:
            for j, span in enumerate(document[:left]):
                context = [int(t) for s in document[max(j - before, 0) : j] for t in s]
                ids = torch.tensor([[lm.config.bos_token_id, *context, *map(int, span)]])
                with torch.no_grad():
                    logp = lm(input_ids=ids).logits[0, :-1].log_softmax(-1)
                nats = -logp[len(context) :].gather(1, ids[0, len(context) + 1 :, None]).sum()
                bits.append(float(nats) / math.log(2))
            left -= len(document[:left])
        assert summary[f"val_{key}"] == pytest.approx(sum(bits) / len(bits), rel=1e-4), key
    # samples: documents of 3 spans, each drawn after the ones before it
    sampled = invoke("sample", tmp_path / "next", "-n", "2", "--out", tmp_path / "docs")
    assert sampled.exit_code == 0, sampled.output
    assert "2 documents of 3 spans sampled into" in sampled.output
    lines = (tmp_path / "docs" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(len(json.loads(line)["text"]) >= 3 for line in lines)
    evaluated = invoke("evaluate", tmp_path / "next")
    assert evaluated.exit_code == 0, evaluated.output
    assert "12 validation spans after the ones before them" in evaluated.output
    # the documents' j-th spans are drawn together; greedy, that is what one document at a time
    # (a batch of 1, a slow reference) draws
    import numpy as np

    from pips.models.code_tokens import layout_spec
    from pips.tasks.checkpoints import find_checkpoint, load_model
    from pips.tasks.prior import SEP_IO, document_row, grid_fields

    loaded = load_model(find_checkpoint(tmp_path / "next"))
    prior, task = loaded.model.eval(), get_task(loaded.config)
    data = task.datamodule(layout_spec(prior.layout))
    generator = torch.Generator().manual_seed(0)
    drawn = task.sequences.sample_rows(prior, data, 3, generator, batch_size=2, top_k=1)
    layout, vocab = prior.layout, prior.layout.vocab_size
    for document in drawn:
        reference: list = []
        for _ in range(3):
            condition = coordinates = None
            if reference:
                row = document_row(grid_fields(layout, reference), vocab)
                condition = torch.as_tensor([*row.tokens, vocab + SEP_IO]).long()
                coordinates = torch.as_tensor(np.concatenate([row.coordinates, np.zeros((1, 3))]))
            tokens = prior.sample(1, condition, greedy=True, condition_coordinates=coordinates)
            reference.append(tokens[0, : int(layout.lengths(tokens)[0])].numpy())
        assert [r.tolist() for r in document] == [r.tolist() for r in reference]


def test_document_windows_and_rows():
    import numpy as np

    from pips.data.text import first_items
    from pips.tasks.prior import (
        DEMO_OUTPUT,
        SEPARATOR,
        TEST_OUTPUT,
        GridFields,
        document_row,
        windows,
    )

    assert windows(3, 8) == [(0, 3)]
    assert windows(10, 4) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert windows(5, 1) == [(i, i + 1) for i in range(5)]
    covered = {i for a, b in windows(23, 6) for i in range(a, b)}
    assert covered == set(range(23)) and all(b - a == 6 for a, b in windows(23, 6))
    assert first_items([[1, 2], [], [3, 4, 5], [6]], 4) == [[1, 2], [3, 4]]
    assert first_items([[1], [2]], None) == [[1], [2]]

    def span(values):
        n = len(values)
        return GridFields(
            np.array(values, dtype=np.int32),
            np.zeros((n, 3), dtype=np.int16),
            np.zeros(n, dtype=np.int32),
            np.full(n, 10, dtype=np.int32),
        )

    row = document_row([span([1, 2]), span([3]), span([4, 5, 6])], vocab=10)
    assert row.tokens.tolist() == [1, 2, 11, 3, 11, 4, 5, 6]
    assert (
        row.role.tolist()
        == [DEMO_OUTPUT] * 2 + [SEPARATOR, DEMO_OUTPUT, SEPARATOR] + [TEST_OUTPUT] * 3
    )
    assert row.test_output_tokens.tolist() == [4, 5, 6]
    assert row.suffix(row.test_output).tokens.tolist() == [4, 5, 6]  # the span alone


def test_a_document_prior_needs_documents(tmp_path):
    from pips.config import load_config
    from pips.tasks.base import TaskError, get_task

    config = load_config(None, ["task=grids"])
    with pytest.raises(TaskError, match="follow each other in documents"):
        get_task(config).prior_documents()


def test_a_next_span_prior_over_an_overlap_run_decodes_each_span_after_the_one_before(
    tiny_lm, tmp_path
):
    from pips.tasks.base import get_task
    from pips.tasks.checkpoints import find_checkpoint, load_model
    from pips.tasks.text import span_nll_bits

    root = f"run_root={tmp_path}"
    trained = invoke("train", *common(tiny_lm), "text.mode=overlap", root, "name=vae")
    assert trained.exit_code == 0, trained.output
    arguments = ["prior.context=document", "prior.document_spans=3"]
    result = invoke("train", *prior_arguments(tmp_path / "vae", *arguments), root, "name=next")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "next" / "summary.json").read_text())
    # slow reference: each validation span's codes, decoded one span at a time after the span
    # before it (a document's first after BOS alone)
    loaded = load_model(find_checkpoint(tmp_path / "vae"))
    model = loaded.model.eval()
    config = loaded.config
    _, documents = get_task(config).prior_documents()
    bits = []
    with torch.no_grad():
        for document in documents:
            for j, span in enumerate(document):
                tokens = torch.as_tensor(span)[None].long()
                quantized = model.encode(tokens).quantizer.quantized
                context = torch.as_tensor(document[j - 1])[None].long() if j else None
                bits.append(float(span_nll_bits(model.decode(quantized, tokens, context), tokens)))
    assert summary["decoder_bits"] == pytest.approx(sum(bits) / len(bits), rel=1e-4)
    # sampled documents are decoded in order, each span after the span decoded before it
    sampled = invoke("sample", tmp_path / "next", "-n", "2", "--out", tmp_path / "s")
    assert sampled.exit_code == 0, sampled.output
    lines = (tmp_path / "s" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["text"] for line in lines)
    task = get_task(config)
    codes = [
        [model.encode(torch.as_tensor(s)[None].long()).quantizer.indices[0] for s in d]
        for d in documents[:3]
    ]
    chained = task.decode_in_order(model, [[c.numpy() for c in d] for d in codes])
    with torch.no_grad():  # slow reference: one document, one span, one token at a time
        for document, decoded in zip(codes, chained, strict=True):
            before = None
            for code, span in zip(document, decoded, strict=True):
                quantized = model.quantizer.codes_to_quantized(code[None])
                out: list[int] = []
                for i in range(config.text.span_tokens):
                    logits = model.decode(quantized, torch.tensor([[*out, 0]]), before)
                    out.append(int(logits[0, i].argmax()))
                assert span.tolist() == out
                before = torch.tensor([out])

    # pips generate --text on an overlap run: each span decoded (greedy, KV cache) from its codes
    # after the given text's previous span; slow reference: argmax, one teacher-forced pass a
    # token, no cache
    from pips.models.text_vae import load_tokenizer

    text = "The quick brown fox jumps over the lazy dog, then sleeps."
    generated = invoke("generate", tmp_path / "vae", "--text", text)
    assert generated.exit_code == 0, generated.output
    decoded = [
        line.split(": ", 1)[1] for line in generated.output.splitlines() if "decoded:" in line
    ]
    tokenizer = load_tokenizer(config.text.lm)
    ids = tokenizer.encode(text, add_special_tokens=False)
    size = config.text.span_tokens
    pieces = [ids[start : start + size] for start in range(0, len(ids), size)]
    assert len(decoded) == len(pieces) == 4
    with torch.no_grad():
        for j, piece in enumerate(pieces):
            tokens = torch.tensor([piece])
            quantized = model.encode(tokens).quantizer.quantized
            context = torch.tensor([pieces[j - 1]]) if j else None
            out: list[int] = []
            for i in range(len(piece)):
                logits = model.decode(quantized, torch.tensor([[*out, 0]]), context)
                out.append(int(logits[0, i].argmax()))
            assert decoded[j] == repr(tokenizer.decode(out))
    encoded = invoke("encode", tmp_path / "vae", "--out", tmp_path / "codes.npz")
    assert encoded.exit_code == 0, encoded.output
    refused = invoke("generate", tmp_path / "vae", "--codes", tmp_path / "codes.npz")
    assert refused.exit_code == 2 and "text.mode=overlap" in refused.output
