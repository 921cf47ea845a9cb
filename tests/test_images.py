"""Images: datasets (digits, IDX files, folders), the block DCT, pixel losses and PSNR, and the
conv and ViT autoencoders overfitting a small batch of digits."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch

from pips.config import ImageConfig, load_config
from pips.data.images import IDX_FILES, ImageDataError, load_images, read_idx, write_idx
from pips.losses import logit_laplace_mean, logit_laplace_nll, pixel_loss, psnr
from pips.models.image_ae import ImageAutoencoder
from pips.nn.conv import ConvDecoder, ConvEncoder
from pips.nn.dct import (
    block_dct,
    block_idct,
    blocks_to_zigzag,
    dct_matrix,
    inverse_zigzag_order,
    zigzag_order,
    zigzag_to_blocks,
)

# ----------------------------------------------------------------------------------- DCT

# ITU T.81 (JPEG) figure 5: the zigzag sequence of an 8 x 8 block as row-major flat indices
JPEG_ZIGZAG_8 = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5,
    12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28,
    35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
    58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
]  # fmt: skip


def test_zigzag_orders_are_jpegs():
    assert zigzag_order(4).tolist() == [0, 1, 4, 8, 5, 2, 3, 6, 9, 12, 13, 10, 7, 11, 14, 15]
    assert zigzag_order(8).tolist() == JPEG_ZIGZAG_8
    assert zigzag_order(1).tolist() == [0]
    for size in (1, 2, 3, 5, 8):
        order, inverse = zigzag_order(size), inverse_zigzag_order(size)
        assert sorted(order.tolist()) == list(range(size * size))
        assert torch.equal(order[inverse], torch.arange(size * size))


def test_dct_is_orthonormal_and_matches_scipy():
    from scipy.fft import dctn

    for size in (1, 2, 4, 8):
        matrix = dct_matrix(size, torch.float64)
        assert torch.allclose(matrix @ matrix.T, torch.eye(size, dtype=torch.float64), atol=1e-14)
    blocks = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    expected = dctn(blocks.numpy(), type=2, norm="ortho", axes=(-2, -1))
    assert np.allclose(block_dct(blocks).numpy(), expected, atol=1e-12)
    constant = torch.full((4, 4), 0.5, dtype=torch.float64)
    coefficients = block_dct(constant)
    assert coefficients[0, 0].item() == pytest.approx(4 * 0.5)  # DC = p * mean
    assert coefficients.flatten()[1:].abs().max().item() < 1e-14


def test_block_dct_round_trips_exactly():
    generator = torch.Generator().manual_seed(0)
    for dtype, tolerance in ((torch.float64, 1e-13), (torch.float32, 1e-5)):
        blocks = torch.rand(5, 3, 8, 8, generator=generator).to(dtype)
        coefficients = block_dct(blocks)
        assert (block_idct(coefficients) - blocks).abs().max().item() < tolerance
        # Parseval: the orthonormal transform keeps the sum of squares
        assert torch.allclose(coefficients.pow(2).sum(), blocks.pow(2).sum(), rtol=1e-5)
        zigzagged = blocks_to_zigzag(coefficients)
        assert zigzagged.shape == (5, 3, 64)
        assert torch.equal(zigzagged[..., 0], coefficients[..., 0, 0])
        assert torch.equal(zigzagged[..., 2], coefficients[..., 1, 0])  # third: (1, 0)
        assert torch.equal(zigzag_to_blocks(zigzagged, 8), coefficients)


# ----------------------------------------------------------------------------------- pixel losses


def test_l2_and_l1_match_hand_computation():
    prediction = torch.tensor([0.5, 0.0, 1.0, 0.25]).view(1, 1, 2, 2)
    target = torch.tensor([0.25, 1.0, 1.0, 0.75]).view(1, 1, 2, 2)
    assert pixel_loss("l2", prediction, target).item() == pytest.approx(
        (0.0625 + 1.0 + 0.0 + 0.25) / 4
    )
    assert pixel_loss("l1", prediction, target).item() == pytest.approx((0.25 + 1 + 0 + 0.5) / 4)
    with pytest.raises(ValueError, match="logit_laplace takes params"):
        pixel_loss("logit_laplace", prediction, target)
    with pytest.raises(ValueError, match="pixel loss 'l3' is unknown"):
        pixel_loss("l3", prediction, target)


def test_logit_laplace_matches_its_closed_form():
    # x = 0.5 -> y = 0.5, logit(y) = 0; mu = 0, b = 1: log 2 + 0 + 2 log(1/2) + 0 = -log 2
    half = torch.tensor([0.5])
    zero = torch.zeros(1)
    assert logit_laplace_nll(zero, zero, half).item() == pytest.approx(-math.log(2), abs=1e-6)
    # x = 0 -> y = 0.1, logit(y) = -log 9; mu = 0.5, b = 2
    expected = (
        math.log(2) + math.log(2) + math.log(0.1) + math.log(0.9) + abs(-math.log(9) - 0.5) / 2
    )
    nll = logit_laplace_nll(torch.tensor([0.5]), torch.tensor([math.log(2)]), torch.zeros(1))
    assert nll.item() == pytest.approx(expected, abs=1e-6)
    # pixel_loss averages the per-pixel values
    params = (torch.tensor([0.0, 0.5]), torch.tensor([0.0, math.log(2)]))
    loss = pixel_loss("logit_laplace", params, torch.tensor([0.5, 0.0]))
    assert loss.item() == pytest.approx((-math.log(2) + expected) / 2, abs=1e-6)


def test_logit_laplace_is_a_density_of_y():
    # y = 0.8 x + 0.1 covers (0, 1) for x in (-1/8, 9/8); integrate f(y) dy = f(y(x)) 0.8 dx
    x = torch.linspace(-0.125, 1.125, 400_001, dtype=torch.float64)[1:-1]
    mu, log_scale = torch.full_like(x, 0.3), torch.full_like(x, math.log(0.5))
    density = torch.exp(-logit_laplace_nll(mu, log_scale, x).double()) * 0.8
    assert torch.trapezoid(density, x).item() == pytest.approx(1.0, abs=2e-3)


def test_logit_laplace_mean_maps_mu_back_to_pixels():
    mu = torch.tensor([-math.log(9), 0.0, math.log(9), 10.0, -10.0])  # logit(0.1), 0, logit(0.9)
    assert logit_laplace_mean(mu).tolist() == pytest.approx([0.0, 0.5, 1.0, 1.0, 0.0], abs=1e-6)


def test_psnr_matches_hand_computation():
    target = torch.zeros(2, 3, 4, 4)
    reconstruction = torch.stack([torch.full((3, 4, 4), 0.1), torch.full((3, 4, 4), 0.01)])
    per_image, mean = psnr(reconstruction, target)
    assert per_image.tolist() == pytest.approx([20.0, 40.0], abs=1e-4)  # 10 log10(1 / MSE)
    assert mean.item() == pytest.approx(30.0, abs=1e-4)
    assert psnr(reconstruction * 255, target, max_value=255.0).mean.item() == pytest.approx(
        30.0, abs=1e-3
    )


# ----------------------------------------------------------------------------------- datasets


def test_digits_split_sizes_and_values():
    data = load_images(ImageConfig(), seed=0)
    assert data.name == "digits"
    assert data.train.shape == (1438, 1, 8, 8) and data.val.shape == (359, 1, 8, 8)  # 1797 x 0.2
    assert data.train.dtype == torch.float32
    assert data.train.min().item() == 0.0 and data.train.max().item() == 1.0
    assert ((data.train * 16).round() == data.train * 16).all()  # values are k / 16
    labels = torch.cat([data.train_labels, data.val_labels])
    assert torch.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    again, other = load_images(ImageConfig(), seed=0), load_images(ImageConfig(), seed=1)
    assert torch.equal(again.val, data.val) and not torch.equal(other.val_labels, data.val_labels)
    resized = load_images(ImageConfig(size=16, val_fraction=0.5))
    assert resized.train.shape == (899, 1, 16, 16) and resized.val.shape == (898, 1, 16, 16)
    assert resized.train.min().item() >= 0.0 and resized.train.max().item() <= 1.0


@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-5, 0, 7], dtype=np.int32),
        np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
        np.array([1.5, -2.25], dtype=np.float64),
    ],
)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(array, suffix, tmp_path):
    path = tmp_path / f"values-idx{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == array.dtype and back.shape == array.shape
    assert np.array_equal(back, array)


def test_idx_header_is_mnists(tmp_path):
    write_idx(tmp_path / "images", np.zeros((2, 28, 28), dtype=np.uint8))
    data = (tmp_path / "images").read_bytes()
    assert data[:16] == bytes.fromhex("00000803 00000002 0000001c 0000001c")  # magic 2051
    assert len(data) == 16 + 2 * 28 * 28
    (tmp_path / "broken").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")
    with pytest.raises(ImageDataError, match="truncated"):
        read_idx(tmp_path / "broken")


def _fake_mnist(folder, train: int = 12, val: int = 5, gz: bool = True):
    generator = np.random.default_rng(0)
    arrays = {
        "train_images": generator.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        "train_labels": generator.integers(0, 10, train, dtype=np.uint8),
        "val_images": generator.integers(0, 256, (val, 28, 28), dtype=np.uint8),
        "val_labels": generator.integers(0, 10, val, dtype=np.uint8),
    }
    for position, (key, array) in enumerate(arrays.items()):
        suffix = ".gz" if gz and position % 2 == 0 else ""  # some gzipped, some not
        write_idx(folder / f"{IDX_FILES[key]}{suffix}", array)
    return arrays


def test_mnist_from_idx_files(tmp_path):
    arrays = _fake_mnist(tmp_path)
    data = load_images(ImageConfig(dataset="mnist", folder=str(tmp_path)))
    assert data.name == "mnist"
    assert data.train.shape == (12, 1, 28, 28) and data.val.shape == (5, 1, 28, 28)
    assert torch.equal(data.train[:, 0] * 255, torch.tensor(arrays["train_images"]).float())
    assert data.val_labels.tolist() == arrays["val_labels"].tolist()
    assert data.train_labels.dtype == torch.long
    fashion = load_images(ImageConfig(dataset="fashion-mnist", folder=str(tmp_path), size=14))
    assert fashion.name == "fashion-mnist" and fashion.train.shape == (12, 1, 14, 14)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "rb") as handle:
        assert handle.read(4) == bytes.fromhex("00000803")


def test_missing_mnist_names_the_folder_and_the_files(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ImageDataError) as error:
        load_images(ImageConfig(dataset="mnist", folder=str(missing)))
    message = str(error.value)
    assert str(missing) in message and "does not exist" in message
    for name in IDX_FILES.values():
        assert name in message
    assert "download" in message
    _fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ImageDataError, match="lacks t10k-labels-idx1-ubyte,? but"):
        load_images(ImageConfig(dataset="fashion-mnist", folder=str(tmp_path)))
    with pytest.raises(ImageDataError, match="images.folder, which is not set"):
        load_images(ImageConfig(dataset="mnist"))


def test_folder_of_generated_images(tmp_path):
    from PIL import Image

    generator = np.random.default_rng(0)
    for klass, count in (("cats", 3), ("dogs", 2)):
        (tmp_path / klass).mkdir()
        for index in range(count):
            pixels = generator.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / klass / f"{index}.png")
    Image.fromarray(np.full((6, 6), 255, dtype=np.uint8)).save(tmp_path / "dogs" / "white.JPG")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")

    config = ImageConfig(dataset="folder", folder=str(tmp_path), size=8, val_fraction=0.5)
    data = load_images(config)
    assert data.name == f"folder:{tmp_path.name}" and data.classes == ("cats", "dogs")
    assert data.train.shape == (3, 3, 8, 8) and data.val.shape == (3, 3, 8, 8)
    assert data.train.min().item() >= 0.0 and data.train.max().item() <= 1.0
    labels = torch.cat([data.train_labels, data.val_labels]).sort().values
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    everything = torch.cat([data.train, data.val])
    assert any(torch.allclose(image, torch.ones(3, 8, 8)) for image in everything)  # white.JPG

    gray = load_images(ImageConfig(dataset="folder", folder=str(tmp_path), size=4, grayscale=True))
    assert gray.train.shape[1:] == (1, 4, 4)

    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(tmp_path / "loose.png")
    loose = load_images(config)
    assert loose.train_labels is None and loose.classes is None  # not every image in a subfolder

    with pytest.raises(ImageDataError, match="needs images.size"):
        load_images(ImageConfig(dataset="folder", folder=str(tmp_path)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageDataError, match="holds no .png"):
        load_images(ImageConfig(dataset="folder", folder=str(tmp_path / "empty"), size=8))
    (tmp_path / "cats" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageDataError, match="bad.png cannot be read"):
        load_images(config)


# ----------------------------------------------------------------------------------- models

SMALL = [
    "model.width=32",
    "model.heads=2",
    "model.encoder_layers=1",
    "model.decoder_layers=1",
    "model.quantizer.codebook_size=64",
    "model.quantizer.levels=[5,5,5]",
    "images.channels=16",
    "images.res_blocks=1",
]


def _model(*overrides: str, channels: int = 1, size: int = 8, seed: int = 0):
    config = load_config(overrides=[*SMALL, *overrides])
    torch.manual_seed(seed)
    return ImageAutoencoder(config.model, config.images, channels, size), config


def test_conv_encoder_and_decoder_shapes():
    encoder = ConvEncoder(3, 8, 5, downsample=2, res_blocks=1)
    decoder = ConvDecoder(5, 8, 6, downsample=2, res_blocks=1)
    latents = encoder(torch.rand(2, 3, 16, 16))
    assert latents.shape == (2, 5, 4, 4)
    assert decoder(latents).shape == (2, 6, 16, 16)
    with pytest.raises(ValueError, match="divisible by 4"):
        encoder(torch.rand(1, 3, 10, 10))


@pytest.mark.parametrize(
    "overrides, codes",
    [
        (["images.backbone=conv", "images.downsample=2"], (2, 2)),
        (["images.backbone=vit", "model.patch_size=4", "images.dct=true"], (2, 2)),
        (["images.backbone=vit", "model.patch_size=2"], (4, 4)),
    ],
)
def test_autoencoder_outputs_and_decode_codes(overrides, codes):
    model, _ = _model(*overrides, "model.quantizer.kind=vq", channels=3)
    assert model.code_shape == codes
    images = torch.rand(2, 3, 8, 8)
    output = model(images, temperature=0.5, hardness=1.0, noise_scale=0.0)
    count = codes[0] * codes[1]
    assert output.reconstruction.shape == (2, 3, 8, 8)
    assert 0.0 <= output.reconstruction.min() and output.reconstruction.max() <= 1.0
    assert output.params.shape == (2, 3, 8, 8)
    encoded = output.encoded
    assert encoded.latents.shape == (2, count, 32)
    assert encoded.quantizer.indices.shape == (2, count)
    assert encoded.latent_positions.shape == (2, count, 2)
    assert encoded.latent_positions[0, 1].tolist() == [0, 1]
    assert encoded.latent_positions[0, codes[1]].tolist() == [1, 0]
    assert not encoded.latent_padding.any() and encoded.latent_padding.shape == (2, count)
    model.eval()
    with torch.no_grad():
        output = model(images)
        decoded = model.decode_codes(output.encoded.quantizer.indices)
    assert torch.allclose(decoded, output.reconstruction, atol=1e-6)


def test_vit_patches_round_trip_through_the_dct():
    model, _ = _model("images.backbone=vit", "model.patch_size=4", "images.dct=true", channels=3)
    images = torch.rand(2, 3, 8, 8)
    patches = model.patchify(images)
    assert patches.shape == (2, 4, 3 * 16)
    assert patches[0, 0, 0].item() == pytest.approx(4 * images[0, 0, :4, :4].mean().item())  # DC
    assert torch.allclose(model.unpatchify(patches)[:, 0], images, atol=1e-6)


def test_logit_laplace_params_and_residual_codes():
    model, _ = _model(
        "images.backbone=vit",
        "images.reconstruction=logit_laplace",
        "model.quantizer.kind=rvq",
        "model.quantizer.num_stages=2",
    )
    output = model(torch.rand(3, 1, 8, 8))
    mu, log_scale = output.params
    assert mu.shape == log_scale.shape == (3, 1, 8, 8)
    assert torch.allclose(output.reconstruction, logit_laplace_mean(mu))
    assert output.encoded.quantizer.indices.shape == (3, 16, 2)
    model.eval()
    with torch.no_grad():
        output = model(torch.rand(3, 1, 8, 8))
        decoded = model.decode_codes(output.encoded.quantizer.indices)
    assert torch.allclose(decoded, output.reconstruction, atol=1e-5)


def test_sizes_that_do_not_fit_are_named():
    with pytest.raises(ValueError, match="images.downsample=2 times; use a size divisible by 4"):
        _model("images.backbone=conv", "images.downsample=2", size=10)
    with pytest.raises(ValueError, match="model.patch_size=3"):
        _model("images.backbone=vit", "model.patch_size=3", size=8)
    model, _ = _model("images.backbone=conv")
    with pytest.raises(ValueError, match=r"takes images \[B, 1, 8, 8\]"):
        model(torch.rand(2, 3, 8, 8))


@pytest.fixture(scope="module")
def digit_batch() -> torch.Tensor:
    return load_images(ImageConfig()).train[:16]  # [16, 1, 8, 8]


# Measured on 2 CPU cores, 200 Adam steps at 2e-3 on 16 digits, eval-mode PSNR for seeds 0/1/2
# (predicting the batch's mean image scores 11.6 dB): conv+vq 50.2/43.6/44.5 dB, vit+vq (4-dim
# codes) 22.0/23.5/22.3, vit+dct+vq 21.0/22.3/23.8, conv+fsq+logit_laplace 20.8/19.7/20.3,
# vit+none+l1 33.4/36.5/37.3. A decoder that ignored its codes would stay near 11.6 dB.
OVERFIT = [
    pytest.param(["images.backbone=conv", "model.quantizer.kind=vq"], 35.0, id="conv-vq"),
    pytest.param(
        ["images.backbone=vit", "model.quantizer.kind=vq", "model.quantizer.dim=4"],
        19.0,
        id="vit-vq",
    ),
    pytest.param(
        ["images.backbone=vit", "images.dct=true", "model.quantizer.kind=vq"]
        + ["model.quantizer.dim=4"],
        19.0,
        id="vit-dct-vq",
    ),
    pytest.param(
        ["images.backbone=conv", "model.quantizer.kind=fsq"]
        + ["images.reconstruction=logit_laplace"],
        17.0,
        id="conv-fsq-logit_laplace",
    ),
    pytest.param(
        ["images.backbone=vit", "model.quantizer.kind=none", "images.reconstruction=l1"],
        28.0,
        id="vit-none-l1",
    ),
]


@pytest.mark.parametrize("overrides, min_psnr", OVERFIT)
def test_autoencoder_overfits_a_batch_of_digits(overrides, min_psnr, digit_batch):
    model, config = _model(*overrides)
    kind = config.images.reconstruction
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = None
    for _ in range(200):
        output = model(digit_batch)
        loss = pixel_loss(kind, output.params, digit_batch)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        (loss + output.encoded.quantizer.loss).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        output = model(digit_batch)
    final = pixel_loss(kind, output.params, digit_batch).item()
    score = psnr(output.reconstruction, digit_batch).mean.item()
    mean_image = digit_batch.mean(0, keepdim=True).expand_as(digit_batch)
    baseline = psnr(mean_image, digit_batch).mean.item()
    assert baseline == pytest.approx(11.6, abs=0.1)
    if kind == "logit_laplace":
        assert final < first - 2.0, (first, final)  # nats per sub-pixel
    else:
        assert final < first / 10, (first, final)
    assert score > min_psnr, score
