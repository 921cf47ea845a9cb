"""What each lever against the LM-VAE's posterior collapse does to ``codes_bits_carried``: the
text VAE of ``configs/text_vae.yaml`` trained for the same steps on the same batches (seeded)
once per setting, each scored on the same held-out spans as ``pips train`` scores them (own
codes, another span's codes, the frozen LM). A setting is a list of ``text.*`` / ``model.*``
overrides applied on top of ``--base`` (default: the preset with every lever off).

    python benchmarks/text_levers.py                          # every setting, 120 steps each
    python benchmarks/text_levers.py --steps 300 --settings prefix memory+norm
    python benchmarks/text_levers.py --memorize 8             # 8 fixed spans: can codes carry?
    python benchmarks/text_levers.py --base text.source=arc   # the same on ARC grids as text

``--memorize N`` trains and scores on the same N training spans: it shows whether the latent
path can carry information at all (memorisation), apart from whether it generalises.
"""

from __future__ import annotations

import argparse
import time

import torch

from pips.config import load_config
from pips.tasks.base import get_task
from pips.tasks.text import TextBatch, TextDataModule

OFF = [
    "text.inject=prefix",
    "text.bow_weight=0",
    "text.latent_norm=false",
    "text.decoder_warmup=0",
    "text.word_dropout=0",
    "text.pooling=queries",
    "text.align=none",
]
SETTINGS = {
    "prefix": [],
    "prefix+norm": ["text.latent_norm=true"],
    "memory": ["text.inject=memory"],
    "memory+norm": ["text.inject=memory", "text.latent_norm=true"],
    "memory+norm+latent-first": [
        "text.inject=memory",
        "text.latent_norm=true",
        "text.decoder_warmup=1000000",
    ],
    "memory+norm+latent-first+dropout": [
        "text.inject=memory",
        "text.latent_norm=true",
        "text.decoder_warmup=1000000",
        "text.word_dropout=0.3",
    ],
    "memory+norm+latent-first+dropout+bow": [
        "text.inject=memory",
        "text.latent_norm=true",
        "text.decoder_warmup=1000000",
        "text.word_dropout=0.3",
        "text.bow_weight=1",
    ],
    "memory+norm+latent-first+dropout+chunks": [
        "text.inject=memory",
        "text.latent_norm=true",
        "text.decoder_warmup=1000000",
        "text.word_dropout=0.3",
        "text.pooling=chunks",
    ],
    **{
        f"memory+norm+latent-first+dropout+chunks+align-{where}": [
            "text.inject=memory",
            "text.latent_norm=true",
            "text.decoder_warmup=1000000",
            "text.word_dropout=0.3",
            "text.pooling=chunks",
            f"text.align={where}",
        ]
        for where in ("inputs", "outputs", "both")
    },
    "gaussian+memory+free-bits": [
        "text.inject=memory",
        "text.latent=gaussian",
        "text.free_bits=2",
        "text.kl_weight=0.5",
    ],
}


class _NoUsage:
    """Code usage is not what this benchmark compares."""

    def update(self, *args) -> None:
        pass


def run(name: str, overrides: list[str], arguments) -> dict:
    config = load_config("configs/text_vae.yaml", [*OFF, *arguments.base, *overrides])
    torch.manual_seed(arguments.seed)
    task = get_task(config)
    data = TextDataModule(task)
    data.setup()
    model = task.new_model(data.shape)
    kl_weight = config.text.kl_weight.resolve(arguments.steps)
    train, context = data.train_items
    if arguments.memorize:
        train, context = train[: arguments.memorize], context[: arguments.memorize]
        val, val_context = train, context
    else:
        val, val_context = data.val_items[0][: arguments.val], data.val_items[1][: arguments.val]
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=arguments.lr)
    generator = torch.Generator().manual_seed(arguments.seed)
    batch_size = config.data.batch_size
    start = time.perf_counter()
    model.train()
    for step in range(arguments.steps):
        rows = torch.randint(len(train), (batch_size,), generator=generator)
        batch = TextBatch(train[rows], context[rows] if context.shape[1] else None)
        model.freeze_decoder(step < config.text.decoder_warmup)
        output = model(batch.tokens, batch.context)
        loss = task.loss(output, batch)
        latent_weight = kl_weight(step) if config.text.latent == "gaussian" else 1.0
        if output.encoded.quantizer.loss is not None:
            loss = loss + latent_weight * output.encoded.quantizer.loss
        if output.bow_nats is not None:
            loss = loss + config.text.bow_weight * output.bow_nats
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    quality = task.metric()
    for first in range(0, len(val), 16):
        rows = slice(first, first + 16)
        batch = TextBatch(val[rows], val_context[rows] if val_context.shape[1] else None)
        task.score(model, batch, quality, _NoUsage())
    metrics = quality.compute()
    metrics["seconds_per_step"] = seconds / max(arguments.steps, 1)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--base", nargs="*", default=[], help="overrides for every setting")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--val", type=int, default=128, help="held-out spans scored")
    parser.add_argument("--memorize", type=int, default=0, help="train and score on N spans")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    where = f"{arguments.memorize} memorised spans" if arguments.memorize else "held-out spans"
    print(f"{arguments.steps} steps per setting, scored on {where}, bits per span")
    print(
        f"{'setting':34s} {'carried':>8s} {'capacity':>8s} {'own':>7s} {'rolled':>7s} "
        f"{'LM':>7s} {'tokens':>6s} {'s/step':>6s}"
    )
    for name in arguments.settings:
        m = run(name, SETTINGS[name], arguments)
        print(
            f"{name:34s} {m['codes_bits_carried']:8.2f} {m['capacity_bits']:8.1f} "
            f"{m['nll_bits']:7.1f} {m['nll_rolled_bits']:7.1f} {m['lm_nll_bits']:7.1f} "
            f"{m['token_accuracy']:6.3f} {m['seconds_per_step']:6.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
