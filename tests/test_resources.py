"""Resources decided by the service, not by the input: the model's cost estimated on the meta
device before anything is allocated, images bounded after resizing, archives sharing one
budget and one compression ratio, only the documented image formats decoded.

Where memory is the point, the case runs in a subprocess under ``RLIMIT_AS``: a regression
fails there with MemoryError instead of taking the machine's memory.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.planted.models import TINY_ARCH, TINY_ARGS, save_safetensors, tiny_vit
from workers import inputs
from workers.analysis import budget
from workers.analysis.loading import CheckpointError, ModelTooLarge, build_model, read_state_dict

REPO = Path(__file__).resolve().parents[1]
#: Address space of a subprocess that imports torch (about 4 GiB of mappings) and then does
#: only small work: a model or image the input sized would need far more.
CEILING_BYTES = 6 * 1024**3


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def tiny_state_dict(**overrides: object) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_vit(**overrides).state_dict().items()}


# ---------------------------------------------------------------- estimate before allocation

CEILING_SCRIPT = r"""
import json, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from pathlib import Path
import torch
from workers.analysis.loading import load_checkpoint
from workers.inputs import images_to_pixels
args = json.loads(sys.argv[2])
folder = Path(sys.argv[3])
out = {}
def attempt(name, call):
    try:
        call()
        out[name] = ["ok", ""]
    except BaseException as exc:
        out[name] = [type(exc).__name__, str(exc)]
tiny = dict(args)
del tiny["num_classes"]
attempt("head_n_by_0", lambda: load_checkpoint(folder / "head.safetensors", "vit_tiny_patch16_224", tiny))
wide = {**args, "embed_dim": 65536, "num_heads": 1, "depth": 8}
attempt("wide_and_deep", lambda: load_checkpoint(folder / "tiny.safetensors", "vit_tiny_patch16_224", wide))
attempt("mlp_ratio", lambda: load_checkpoint(folder / "tiny.safetensors", "vit_tiny_patch16_224", {**args, "mlp_ratio": 1e6}))
attempt("tokens", lambda: load_checkpoint(folder / "tiny.safetensors", "vit_tiny_patch16_224", {**args, "img_size": 4096, "patch_size": 1}))
thin = (folder / "thin.png").read_bytes()
attempt("thin_image", lambda: images_to_pixels([("thin.png", thin)], (224, 224)))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def ceiling_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Every memory case in one subprocess under the address-space ceiling."""
    folder = tmp_path_factory.mktemp("ceiling")
    save_safetensors(tiny_vit(), folder / "tiny.safetensors")
    from safetensors.torch import save_file

    head = tiny_state_dict()
    head["head.weight"] = torch.empty(10**9, 0)  # zero bytes on disk, a billion classes asked
    head["head.bias"] = torch.empty(0)
    save_file(head, str(folder / "head.safetensors"))
    (folder / "thin.png").write_bytes(png_bytes(40_000, 1))  # a few hundred bytes
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            CEILING_SCRIPT,
            str(CEILING_BYTES),
            json.dumps(TINY_ARGS),
            str(folder),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_head_of_zero_bytes_cannot_ask_for_a_billion_classes(ceiling_results: dict) -> None:
    assert ceiling_results["head_n_by_0"] == [
        "ModelTooLarge",
        "the checkpoint's head.weight (1000000000, 0) asks for 1000000000 classes, over the limit "
        f"of {budget.MAX_NUM_CLASSES}",
    ]


def test_model_args_whose_product_is_too_large_fail_with_the_numbers(ceiling_results: dict) -> None:
    kind, message = ceiling_results["wide_and_deep"]
    assert kind == "ModelTooLarge", message
    assert message.startswith("'vit_tiny_patch16_224' as configured is too large for this worker: ")
    assert "parameters (VITAUDIT_MAX_MODEL_PARAMS is 4000000000)" in message
    assert ceiling_results["mlp_ratio"] == [
        "ModelTooLarge",
        f"model_args.mlp_ratio is 1000000.0; it must be in (0, {budget.MAX_MLP_RATIO}]",
    ]
    kind, message = ceiling_results["tokens"]
    assert kind == "ModelTooLarge", message
    assert "16777217 tokens per image (VITAUDIT_MAX_TOKENS is 8192)" in message


def test_a_thin_image_is_bounded_after_its_resize(ceiling_results: dict) -> None:
    """40000 x 1 pixels passes the declared-size guard and would become 8960000 x 224."""
    assert ceiling_results["thin_image"] == [
        "ImageInputError",
        "image 'thin.png' (40000x1) would be resized to 8960000x224 pixels, over the limit of "
        f"{inputs.MAX_RESIZED_PIXELS}: its aspect ratio is too extreme",
    ]


def test_the_batch_decides_the_activation_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Activations grow with the batch: the message says which batch size fits."""
    state = tiny_state_dict()
    with torch.device("meta"):
        import timm

        per_image = budget.estimate(
            timm.create_model(TINY_ARCH, **TINY_ARGS)
        ).activation_bytes_per_image
    monkeypatch.setenv("VITAUDIT_MAX_ACTIVATION_BYTES", str(per_image * 8))
    assert build_model(TINY_ARCH, TINY_ARGS, state, batch_size=8).num_classes == 5
    with pytest.raises(ModelTooLarge) as caught:
        build_model(TINY_ARCH, TINY_ARGS, state, batch_size=9)
    assert caught.value.code == "model_too_large"
    assert str(caught.value).endswith(
        f"about {per_image * 9} bytes of activations for a batch of 9 "
        f"(VITAUDIT_MAX_ACTIVATION_BYTES is {per_image * 8}); batch_size 8 would fit"
    )


def test_the_estimate_counts_what_a_model_holds() -> None:
    """Planted: the tiny ViT's parameters and tokens counted by hand (16 patches + class token)."""
    model = tiny_vit()
    with torch.device("meta"):
        import timm

        found = budget.estimate(timm.create_model(TINY_ARCH, **TINY_ARGS))
    assert found.params == sum(p.numel() for p in model.parameters())
    assert found.tokens == 17
    # 2 blocks of 2 heads: 3 maps of 17 x 17 each; linear widths: qkv 96, proj 32, fc1 128,
    # fc2 32 per block and patch_embed's conv is no Linear; norms: 2 per block + final 32.
    widths = 2 * (96 + 32 + 128 + 32) + 2 * 2 * 32 + 32
    floats = 2 * 17 * widths + 3 * 4 * 17**2
    assert found.activation_bytes(1) == 4 * floats


def test_every_real_vit_is_admitted_at_its_default_size() -> None:
    """All of timm's ViTs (service/timm_vit_models.txt) built on the meta device: each is
    within the default limits, and building them allocates nothing."""
    limits = budget.Limits(*budget.LIMIT_DEFAULTS.values())
    names = (REPO / "service" / "timm_vit_models.txt").read_text().split()
    assert len(names) == 179
    largest = budget.Estimate(0, 0, 0)
    for name in names:
        found = budget.estimate(budget.meta_model(name, {}))
        budget.check_estimate(name, found, 1, limits)
        largest = budget.Estimate(
            max(largest.params, found.params),
            max(largest.tokens, found.tokens),
            max(largest.activation_bytes_per_image, found.activation_bytes_per_image),
        )
    # The limits are not far above the largest real model: each is within 4x of it.
    assert limits.max_params < 4 * largest.params
    assert limits.max_tokens < 4 * largest.tokens
    assert limits.max_activation_bytes < 4 * largest.activation_bytes_per_image


def test_state_dict_shapes_are_checked_before_the_model_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tensor of the wrong shape is refused while only the meta model exists."""
    import timm

    state = tiny_state_dict()
    state["blocks.0.mlp.fc1.weight"] = torch.empty(10**9, 0)
    built: list[str] = []
    real_create = timm.create_model

    def create(*args: object, **kwargs: object) -> torch.nn.Module:
        model = real_create(*args, **kwargs)
        built.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(timm, "create_model", create)
    with pytest.raises(CheckpointError, match="size mismatch for blocks.0.mlp.fc1.weight"):
        build_model(TINY_ARCH, TINY_ARGS, state)
    assert built == ["meta"]


# ---------------------------------------------------------------------- decoders and archives

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n%%EndComments\nshowpage\n%%EOF\n"


def test_postscript_never_reaches_ghostscript(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import EpsImagePlugin

    opened: list[str] = []
    real_open = EpsImagePlugin.EpsImageFile._open

    def spy(self: object) -> None:
        opened.append("eps")
        real_open(self)

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", spy)
    with pytest.raises(inputs.ImageInputError) as caught:
        inputs.images_to_pixels([("cat.png", EPS)], (32, 32))
    assert str(caught.value) == (
        "'cat.png' is not a readable image: its content is no known image format "
        "(accepted: PNG, JPEG, BMP, WEBP, TIFF)"
    )
    assert opened == []


def zip_of(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_the_archives_of_a_request_share_one_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = png_bytes(64, 64)
    monkeypatch.setattr(inputs, "MAX_ARCHIVE_BYTES", int(len(image) * 2.5))
    paths = []
    for index in range(2):  # each archive alone is within the limit, together they are not
        paths.append(tmp_path / f"{index}.zip")
        paths[-1].write_bytes(zip_of({"a.png": image, "b.png": image}))
    assert len(inputs.load_images(paths[:1], ["0.zip"], max_images=16)) == 2
    with pytest.raises(inputs.ImageInputError) as caught:
        inputs.load_images(paths, ["0.zip", "1.zip"], max_images=16)
    assert str(caught.value) == (
        f"the images archives inflate beyond {inputs.MAX_ARCHIVE_BYTES} bytes (all archives of "
        "the request together) at 'a.png'"
    )


def test_archive_members_are_read_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checking an archive reads no member; iterating holds one member at a time."""
    archive = tmp_path / "photos.zip"
    archive.write_bytes(zip_of({f"{i}.png": png_bytes(16 + i, 16) for i in range(3)}))
    tar = tmp_path / "photos.tar.gz"
    with tarfile.open(tar, "w:gz") as out:
        for i in range(2):
            data = png_bytes(20 + i, 16)
            info = tarfile.TarInfo(f"t{i}.png")
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    reads: list[str] = []
    real_read = zipfile.ZipFile.read

    def counted(self: zipfile.ZipFile, name: str, pwd: bytes | None = None) -> bytes:
        reads.append(str(name))
        return real_read(self, name, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "read", counted)
    images = inputs.load_images([archive, tar], ["photos.zip", "photos.tar.gz"], max_images=16)
    assert reads == [] and len(images) == 5
    seen = []
    for name, data in images:
        seen.append((name, len(reads)))
        assert Image.open(io.BytesIO(data)).size[1] == 16
    assert seen == [("0.png", 1), ("1.png", 2), ("2.png", 3), ("t0.png", 3), ("t1.png", 3)]
    pixels = inputs.images_to_pixels(images, (16, 16))
    assert pixels.shape == (5, 3, 16, 16)


def test_a_tar_gz_bomb_is_refused_before_it_inflates(tmp_path: Path) -> None:
    size = 50 * 1024**2  # 50 MiB of zeros: about 50 KiB gzipped, 1000x
    path = tmp_path / "photos.tar.gz"
    with gzip.open(path, "wb", compresslevel=1) as raw, tarfile.open(fileobj=raw, mode="w|") as out:
        info = tarfile.TarInfo("a.png")
        info.size = size
        out.addfile(info, _Zeros(size))
    with pytest.raises(inputs.ImageInputError) as caught:
        inputs.load_images([path], ["photos.tar.gz"], max_images=16)
    assert str(caught.value) == (
        f"the images archive 'photos.tar.gz' inflates more than {inputs.MAX_COMPRESSION_RATIO}x "
        f"its {path.stat().st_size} bytes at 'a.png'; is it a tar bomb?"
    )


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, read without ever holding them."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self.left)
        buffer[:count] = b"\0" * count
        self.left -= count
        return count


def test_a_pth_with_compressed_records_obeys_the_ratio(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(5_000_000)}, plain)  # 20 MB of zeros: deflates ~1000x
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
        for info in source.infolist():
            out.writestr(info.filename, source.read(info))
    assert set(read_state_dict(plain)) == {"w"}  # stored records: loaded as before
    with pytest.raises(
        CheckpointError, match=r"^the \.pth file's record '.*/data/0' inflates \d+x "
    ):
        read_state_dict(bomb)


def test_the_service_bounds_mlp_ratio_at_submit() -> None:
    import msgspec

    from service.models import ModelArgs

    assert msgspec.convert({"mlp_ratio": 4.0}, ModelArgs).mlp_ratio == 4.0
    with pytest.raises(msgspec.ValidationError, match="mlp_ratio must be between 0.25 and 16"):
        msgspec.convert({"mlp_ratio": 1e6}, ModelArgs)
