"""transformers checkpoints mapped onto timm: the same outputs, the same position table.

Each supported model type is built tiny and random with `transformers` (offline), saved with
``save_pretrained``, zipped as a folder, and loaded through `workers.hf_checkpoint`; the
mapped timm model must give the same hidden states (or logits) on the same pixels.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.planted.posembed_tables import sincos_2d_table  # noqa: E402
from workers.analysis import hf_mapping  # noqa: E402
from workers.analysis.loading import CheckpointError  # noqa: E402
from workers.analysis.posembed import position_embedding_section  # noqa: E402
from workers.hf_archive import FolderError, open_folder  # noqa: E402
from workers.hf_checkpoint import load_transformers  # noqa: E402

# float32 through 2 blocks of width 32: the two implementations order their sums differently,
# which moves outputs by ~1e-6; 1e-4 is the bound the issue sets for "the same model".
OUTPUT_TOLERANCE = 1e-4
SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
)


def _vision(config_cls, **extra):
    return config_cls(**{**SMALL, **extra})


def _clip_config():
    return transformers.CLIPConfig(
        vision_config={**SMALL, "hidden_act": "quick_gelu"},
        text_config=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        ),
        projection_dim=16,
    )


# (name, model class, config factory, what to compare)
CASES = [
    ("vit", transformers.ViTModel, lambda: _vision(transformers.ViTConfig), "features"),
    (
        "vit-classifier",
        transformers.ViTForImageClassification,
        lambda: _vision(transformers.ViTConfig, num_labels=5, layer_norm_eps=1e-12),
        "logits",
    ),
    (
        "vit-gelu-tanh",
        transformers.ViTModel,
        lambda: _vision(transformers.ViTConfig, hidden_act="gelu_new", qkv_bias=False),
        "features",
    ),
    ("deit", transformers.DeiTModel, lambda: _vision(transformers.DeiTConfig), "features"),
    (
        "deit-classifier",
        transformers.DeiTForImageClassification,
        lambda: _vision(transformers.DeiTConfig, num_labels=4),
        "logits",
    ),
    (
        "deit-distilled",
        transformers.DeiTForImageClassificationWithTeacher,
        lambda: _vision(transformers.DeiTConfig, num_labels=4),
        "logits",
    ),
    (
        "dinov2",
        transformers.Dinov2Model,
        lambda: _vision(transformers.Dinov2Config, layerscale_value=0.5),
        "features",
    ),
    (
        "dinov2-swiglu",
        transformers.Dinov2Model,
        lambda: _vision(transformers.Dinov2Config, use_swiglu_ffn=True),
        "features",
    ),
    (
        "dinov2-registers",
        transformers.Dinov2WithRegistersModel,
        lambda: _vision(transformers.Dinov2WithRegistersConfig, num_register_tokens=3),
        "features",
    ),
    (
        "clip-vision",
        transformers.CLIPVisionModel,
        lambda: _vision(transformers.CLIPVisionConfig),
        "clip_features",
    ),
    (
        "clip-vision-projection",
        transformers.CLIPVisionModelWithProjection,
        lambda: _vision(transformers.CLIPVisionConfig, projection_dim=16),
        "image_embeds",
    ),
    ("clip", transformers.CLIPModel, _clip_config, "image_embeds"),
]


def _randomise(model) -> None:
    """Random weights everywhere, including the zero/one inits (biases, norms, tokens), so a
    key mapped to the wrong place cannot hide behind an initial value."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def save_folder(model, folder: Path) -> Path:
    """``save_pretrained`` into ``folder`` and zip it as the CLI does (members at the root)."""
    model.save_pretrained(folder)
    return _zip_dir(folder)


def _hf_output(model, pixels, what):
    with torch.no_grad():
        if what == "features":
            return model(pixel_values=pixels).last_hidden_state
        if what == "logits":
            return model(pixel_values=pixels).logits
        if what == "clip_features":  # timm's final norm is CLIP's post_layernorm, on every token
            hidden = model(pixel_values=pixels).last_hidden_state
            return getattr(model, "vision_model", model).post_layernorm(hidden)
        if what == "image_embeds":
            if isinstance(model, transformers.CLIPModel):
                out = model.get_image_features(pixel_values=pixels)
                return out if isinstance(out, torch.Tensor) else out.pooler_output
            return model(pixel_values=pixels).image_embeds
    raise ValueError(what)


def _timm_output(model, pixels, what):
    with torch.no_grad():
        if what in ("features", "clip_features"):
            return model.forward_features(pixels)
        return model(pixels)


@pytest.mark.parametrize(
    ("name", "model_cls", "make_config", "what"), CASES, ids=[c[0] for c in CASES]
)
def test_mapped_timm_model_gives_the_same_outputs(name, model_cls, make_config, what, tmp_path):
    torch.manual_seed(0)
    hf = model_cls(make_config()).eval()
    _randomise(hf)
    archive = save_folder(hf, tmp_path / name)
    loaded = load_transformers(archive)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = _hf_output(hf, pixels, what)
    got = _timm_output(loaded.model, pixels, what)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < OUTPUT_TOLERANCE
    assert loaded.source["format"] == "transformers"
    assert loaded.source["model_type"] == hf.config.model_type
    _assert_same_layers(hf.config, loaded.model)


# Layer-norm epsilon and activation differences move these tiny random models' outputs by
# less than OUTPUT_TOLERANCE (eps 1e-12 vs 1e-6: ~1e-7), so they are checked on the modules.
ACTIVATION_TOLERANCE = 1e-6  # gelu_new is written out in transformers, F.gelu(tanh) in timm


def _assert_same_layers(config, model) -> None:
    from transformers.activations import ACT2FN

    vision = getattr(config, "vision_config", config)
    norms = {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert norms == {vision.layer_norm_eps}
    act = "silu" if getattr(vision, "use_swiglu_ffn", False) else vision.hidden_act
    x = torch.linspace(-6, 6, 1201)
    with torch.no_grad():
        ours, theirs = model.blocks[0].mlp.act(x), ACT2FN[act](x)
    assert (ours - theirs).abs().max().item() < ACTIVATION_TOLERANCE


def test_config_defaults_are_those_of_transformers():
    classes = {
        "vit": transformers.ViTConfig,
        "deit": transformers.DeiTConfig,
        "dinov2": transformers.Dinov2Config,
        "dinov2_with_registers": transformers.Dinov2WithRegistersConfig,
        "clip_vision_model": transformers.CLIPVisionConfig,
    }
    for model_type, config_cls in classes.items():
        theirs = config_cls().to_dict()
        ours = hf_mapping.CONFIG_DEFAULTS[model_type]
        # keys a family's config lacks (DINOv2 sizes its MLP by mlp_ratio) are never read for it
        shared = [key for key in ours if key in theirs]
        assert len(shared) >= 8, model_type
        for key in shared:
            assert theirs[key] == ours[key], (model_type, key)


def test_known_arch_names_are_timm_models():
    import timm

    assert hf_mapping.KNOWN_ARCHS | set(hf_mapping.BASE_ARCHS.values()) <= set(timm.list_models())


def test_canonical_shapes_get_timm_names():
    vit_small = {
        "model_type": "vit",
        "hidden_size": 384,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
    }
    assert hf_mapping.timm_spec(vit_small).arch == "vit_small_patch16_224"
    dino = {"model_type": "dinov2", "image_size": 518, "hidden_size": 384, "num_attention_heads": 6}
    spec = hf_mapping.timm_spec(dino)
    assert spec.arch == "vit_small_patch14_dinov2"
    assert spec.model_args["img_size"] == 518  # the stored 37x37 table's own grid
    giant = {
        "model_type": "dinov2",
        "image_size": 518,
        "hidden_size": 1536,
        "num_hidden_layers": 40,
        "num_attention_heads": 24,
        "use_swiglu_ffn": True,
    }
    spec = hf_mapping.timm_spec(giant)
    assert (spec.arch, spec.mlp_layer, spec.model_args["act_layer"]) == (
        "vit_giant_patch14_dinov2",
        "swiglu",
        "silu",
    )
    assert int(1536 * spec.model_args["mlp_ratio"]) == 8192  # facebook/dinov2-giant's weights_in
    odd = {
        "model_type": "vit",
        "hidden_size": 32,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    assert hf_mapping.timm_spec(odd).arch == "vit_base_patch16_224"


def test_unsupported_model_type_is_named_with_the_supported_ones():
    with pytest.raises(hf_mapping.TransformersConfigError) as err:
        hf_mapping.timm_spec({"model_type": "swin"})
    assert str(err.value) == (
        "model_type 'swin' is not a transformers model vitaudit can map to timm; supported model "
        "types: vit, deit, dinov2, dinov2_with_registers, clip_vision_model, clip"
    )


def test_dinov2_table_is_kept_as_stored_and_resampled_by_timm_for_a_smaller_audit(tmp_path):
    hf = transformers.Dinov2Model(_vision(transformers.Dinov2Config, image_size=64)).eval()
    archive = save_folder(hf, tmp_path / "dino")
    stored = hf.embeddings.position_embeddings.detach()
    native = load_transformers(archive)
    assert torch.equal(native.model.pos_embed.detach(), stored)
    smaller = load_transformers(archive, {"img_size": 32})
    assert smaller.model.pos_embed.shape == (1, 1 + 16, 32)
    assert any("resampled" in note for note in smaller.notes)


def test_hf_vit_with_a_planted_sincos_table_scores_like_the_timm_one(tmp_path):
    import timm

    grid, dim = 8, 64
    config = transformers.ViTConfig(
        hidden_size=dim,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=grid * 4,
        patch_size=4,
    )
    hf = transformers.ViTModel(config).eval()
    table = sincos_2d_table(grid, grid, dim).float().reshape(1, grid * grid, dim)
    cls_row = torch.randn(1, 1, dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hf.embeddings.position_embeddings.copy_(torch.cat([cls_row, table], dim=1))
    loaded = load_transformers(save_folder(hf, tmp_path / "sincos"))
    reference = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=grid * 4,
        patch_size=4,
        embed_dim=dim,
        depth=1,
        num_heads=2,
        num_classes=0,
    )
    with torch.no_grad():
        reference.pos_embed.copy_(torch.cat([cls_row, table], dim=1))
    ours = position_embedding_section(loaded.model).data
    theirs = position_embedding_section(reference).data
    assert ours["grid_structure_score"] > 0.95
    assert ours["grid_structure_score"] == pytest.approx(theirs["grid_structure_score"], abs=1e-6)
    assert ours["table_grid"] == [grid, grid]
    assert ours["kind"] == theirs["kind"]


def test_random_table_scores_near_chance_as_the_control(tmp_path):
    config = transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=32,
        patch_size=4,
    )
    hf = transformers.ViTModel(config).eval()
    with torch.no_grad():
        hf.embeddings.position_embeddings.normal_(generator=torch.Generator().manual_seed(4))
    loaded = load_transformers(save_folder(hf, tmp_path / "random"))
    assert position_embedding_section(loaded.model).data["grid_structure_score"] < 0.2


def test_dinov2_classifier_head_is_refused_with_the_reason(tmp_path):
    hf = transformers.Dinov2ForImageClassification(_vision(transformers.Dinov2Config, num_labels=3))
    with pytest.raises(CheckpointError, match="Dinov2ForImageClassification's head"):
        load_transformers(save_folder(hf, tmp_path / "dino-cls"))


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_folder_archive_rules(tmp_path):
    config = json.dumps({"model_type": "vit"}).encode()
    with pytest.raises(FolderError, match="unsafe path '../config.json'"):
        open_folder(_zip(tmp_path / "a.zip", {"../config.json": config}))
    with pytest.raises(FolderError, match="holds no config.json"):
        open_folder(_zip(tmp_path / "b.zip", {"model.safetensors": b"x"}))
    nested = open_folder(
        _zip(tmp_path / "c.zip", {"run/config.json": config, "run/model.safetensors": b"x"})
    )
    assert nested.root == "run/" and nested.weight_files() == ["model.safetensors"]
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("config.json", config)
        zf.writestr("model.safetensors", b"\0" * 20_000_000)
    with pytest.raises(
        FolderError, match="member 'model.safetensors' inflates .*x; is it a zip bomb"
    ):
        open_folder(bomb)
    link = zipfile.ZipInfo("model.safetensors")
    link.external_attr = 0o120777 << 16
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as zf:
        zf.writestr("config.json", config)
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(FolderError, match="link or special file 'model.safetensors'"):
        open_folder(tmp_path / "d.zip")


def test_inputs_are_normalised_as_the_folder_says(tmp_path):
    from workers.analysis.probes import normalize_for_model

    hf = transformers.ViTModel(_vision(transformers.ViTConfig))
    folder = tmp_path / "vit"
    hf.save_pretrained(folder)
    default = load_transformers(save_folder(hf, folder))
    grey = torch.full((1, 3, 32, 32), 0.5)
    assert normalize_for_model(grey, default.model).abs().max().item() == 0.0  # ViT's 0.5 / 0.5
    assert (
        default.source["normalization"]["source"]
        == "the default of transformers' vit image processor"
    )
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.25, 0.5, 0.75], "image_std": 0.25})
    )
    custom = load_transformers(save_folder(hf, folder))
    assert normalize_for_model(grey, custom.model)[0, :, 0, 0].tolist() == [1.0, 0.0, -1.0]
    assert custom.source["normalization"]["source"] == "preprocessor_config.json"
    # what the audit applies: the folder's numbers unless the request gives its own
    from workers.analysis.vit_facts import vit_facts
    from workers.pipeline import _normalization

    facts = vit_facts(custom.model)
    used = _normalization({"options": {}}, facts, custom)
    assert (used.mean, used.std, used.source) == (
        (0.25, 0.5, 0.75),
        (0.25,) * 3,
        "preprocessor_config.json",
    )
    given = {"options": {"normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}}}
    assert _normalization(given, facts, custom).source == "options.normalization"


def test_tar_links_are_refused(tmp_path):
    import io
    import tarfile

    archive = tmp_path / "folder.tar"
    with tarfile.open(archive, "w") as tf:
        data = json.dumps({"model_type": "vit"}).encode()
        info = tarfile.TarInfo("config.json")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("model.safetensors")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    with pytest.raises(FolderError, match="link or special file 'model.safetensors'"):
        open_folder(archive)


def test_weights_that_do_not_fit_their_config_are_named(tmp_path):
    wide = transformers.ViTModel(_vision(transformers.ViTConfig, hidden_size=64))
    folder = tmp_path / "mixed"
    wide.save_pretrained(folder)
    (folder / "config.json").write_text(_vision(transformers.ViTConfig).to_json_string())
    with pytest.raises(CheckpointError) as err:
        load_transformers(_zip_dir(folder))
    assert str(err.value).startswith(
        "the vit weights do not fit their config mapped to 'vit_base_patch16_224': "
    )
    assert "size mismatch" in str(err.value)


def _zip_dir(folder: Path) -> Path:
    """The folder's files as one .zip beside it."""
    archive = folder.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, path.name)
    return archive
