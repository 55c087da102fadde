"""PuLID on the adapter seam: loading, ∅, the identity attention in the UNet, every preset on tiny models."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from fastface.adapters import ADAPTERS, load_adapter, spec_for_backbone
from fastface.backbones import load_backbone
from fastface.errors import ConfigError, InputError, MissingWeightsError
from fastface.faces.types import Identity
from fastface.presets import METHODS
from fastface.testing import PULID_V1_FILE, PULID_V11_FILE, tiny_pulid_dir

PORTRAIT = Path(__file__).resolve().parents[1] / "src" / "fastface" / "data" / "portrait.jpg"
# A face at half the FFHQ template's scale, near the photo's top-left corner.
KEYPOINTS = (np.array([[192.98, 239.95], [318.90, 240.19], [256.63, 314.02], [201.26, 371.41], [313.09, 371.15]])
             * 0.5 + 20).astype(np.float32)
VERSIONS = ("pulid", "pulid-v1.1")


def _identity(seed: int = 0, photos: int = 1) -> Identity:
    raw = np.random.default_rng(seed).standard_normal((photos, 128)).astype(np.float32) * 1.2
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    mean = unit.mean(0) / np.linalg.norm(unit.mean(0))
    extra = {"raw_embeddings": raw} if "raw_embeddings" in {f.name for f in fields(Identity)} else {}
    return Identity(embedding=mean, embeddings=unit, keypoints=[KEYPOINTS] * photos, sources=[str(PORTRAIT)] * photos,
                    backend="dlib", model="test", **extra)


@pytest.fixture(scope="module")
def pulid_dir(tiny_dir):
    return tiny_pulid_dir()


@pytest.fixture(scope="module", params=VERSIONS)
def engine(request, tiny_dir, pulid_dir):
    from fastface.pipeline import FastFacePipeline

    return FastFacePipeline.from_pretrained("tiny", request.param, device="cpu", dtype=torch.float32)


def test_registry_and_modes():
    v1, style, v11 = ADAPTERS["pulid"], ADAPTERS["pulid-style"], ADAPTERS["pulid-v1.1"]
    assert (v1.repo, v1.weight_name, v11.weight_name) == ("guozinan/PuLID", "pulid_v1.bin", "pulid_v1.1.safetensors")
    assert (v1.options["num_zero"], v1.options["ortho"]) == (8, "v2")  # app.py "fidelity"
    assert (style.options["num_zero"], style.options["ortho"]) == (16, "v1")  # app.py "extremely style"
    assert (v11.options["num_zero"], v11.options["ortho"]) == (20, "v2")  # app_v1_1.py defaults
    assert not v1.presets_tuned and v1.face_backend == "antelopev2"
    licences = " ".join(v1.licence)
    assert "Apache-2.0" in licences and "non-commercial" in licences and "MIT" in licences
    assert spec_for_backbone("pulid-v1.1", "tiny").weight_name == PULID_V11_FILE


def test_doctor_lists_the_three_files():
    from fastface.doctor import probe_generation_models

    entry = probe_generation_models()["adapters"]["pulid-v1.1"]
    assert [f["file"] for f in entry["files"]] == ["pulid_v1.1.safetensors", "EVA02_CLIP_L_336_psz14_s6B.pt",
                                                   "parsing_bisenet.pth"]
    if entry["status"] != "present":  # offline test machines: the one command fetching them (the
        # URL-hosted parsing weights included, put beside the checkpoint)
        assert entry["how"] == "fastface download pulid-v1.1"


def test_loading_puts_the_identity_attention_on_every_cross_attention(tiny_dir, pulid_dir):
    from safetensors.torch import load_file

    pipe = load_backbone("tiny", device="cpu")
    adapter = load_adapter(pipe, "pulid-v1.1", backbone="tiny")
    previous = adapter.install(pipe.unet)
    state = load_file(str(pulid_dir / PULID_V11_FILE))
    names = list(pipe.unet.attn_processors)
    installed = {n: p for n, p in pipe.unet.attn_processors.items() if hasattr(p, "id_to_k")}
    assert set(installed) == {n for n in names if n.endswith("attn2.processor")} and installed
    for name, processor in installed.items():
        index = names.index(name)
        assert torch.equal(processor.id_to_k.weight, state[f"id_adapter_attn_layers.{index}.id_to_k.weight"])
        assert torch.equal(processor.id_to_v.weight, state[f"id_adapter_attn_layers.{index}.id_to_v.weight"])
    adapter.uninstall(pipe, previous)
    assert not any(hasattr(p, "id_to_k") for p in pipe.unet.attn_processors.values())


def test_wrong_or_missing_files_are_clear_errors(tiny_dir, pulid_dir, tmp_path):
    pipe = load_backbone("tiny", device="cpu")
    with pytest.raises(InputError, match="v1 \\(IDEncoder\\) checkpoint, which the pulid-v1.1 adapter cannot use"):
        load_adapter(pipe, "pulid-v1.1", backbone="tiny", path=pulid_dir / PULID_V1_FILE)
    lonely = tmp_path / PULID_V1_FILE
    lonely.write_bytes((pulid_dir / PULID_V1_FILE).read_bytes())
    with pytest.raises(MissingWeightsError, match="parsing_bisenet.pth"):
        load_adapter(pipe, "pulid", backbone="tiny", path=lonely, image_encoder=pulid_dir)
    with pytest.raises(MissingWeightsError, match="pulid_v1.bin.*guozinan/PuLID"):
        load_adapter(pipe, "pulid", backbone="sdxl")


def test_null_identity_is_the_encoder_on_zeros_and_tokens_need_the_photo(engine):
    adapter = engine.adapter
    cond = engine.encode_identity(_identity())
    expected_tokens = 10 if adapter.spec.name == "pulid" else 32
    assert cond.cond.shape == (1, expected_tokens, 64) == cond.null.shape
    eva_width = adapter.eva.width
    with torch.no_grad():
        zeros = [torch.zeros(1, 5, eva_width)] * 5
        null = adapter.encoder(torch.zeros(1, 128 + adapter.eva.embed_dim), zeros)
    assert torch.allclose(cond.null, null)
    assert not torch.allclose(cond.cond, cond.null)
    assert cond.info["num_zero"] == adapter.spec.options["num_zero"] == cond.extras["num_zero"]
    with pytest.raises(InputError, match="reads the face photo"):
        engine.encode_identity(np.random.default_rng(0).standard_normal(128).astype(np.float32))


def test_several_photos(engine):
    two = engine.encode_identity(_identity(0, photos=2), mode="concat")
    if engine.adapter.spec.name == "pulid":  # v1: per photo, concatenated (the official "id mix")
        assert two.cond.shape[1] == two.null.shape[1] == 20
        assert torch.equal(two.null[:, :10], two.null[:, 10:])
        mean = engine.encode_identity(_identity(0, photos=2), mode="mean")
        assert mean.cond.shape[1] == 10 and torch.allclose(mean.cond, (two.cond[:, :10] + two.cond[:, 10:]) / 2, atol=1e-6)
    else:  # v1.1: the photos enter the IDFormer together, 32 tokens
        assert two.cond.shape[1] == two.null.shape[1] == 32


def test_processor_adds_the_identity_attention_to_the_text_attention():
    from diffusers.models.attention_processor import Attention

    from fastface.adapters.pulid import PuLIDContext, pulid_processor_class

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16).eval()
    processor = pulid_processor_class()(32, 24, "up")
    x, text, ids = torch.randn(2, 9, 32), torch.randn(2, 5, 24), torch.randn(2, 4, 24)
    with torch.no_grad():
        plain = processor(attn, x, text)
        added = processor(attn, x, text, ip_hidden_states=PuLIDContext(tokens=ids, scale=0.7, step=0, num_zero=3))
        # by hand: softmax over 4 real + 3 zero tokens (zero keys score 0), values of the real ones
        q = attn.to_q(x).view(2, 9, 2, 16).transpose(1, 2)
        k = processor.id_to_k(ids).view(2, 4, 2, 16).transpose(1, 2)
        v = processor.id_to_v(ids).view(2, 4, 2, 16).transpose(1, 2)
        scores = torch.cat([q @ k.transpose(-1, -2) / 4.0, torch.zeros(2, 2, 9, 3)], dim=-1)
        identity = (scores.softmax(-1)[..., :4] @ v).transpose(1, 2).reshape(2, 9, 32)
        expected = plain + 0.7 * (identity @ attn.to_out[0].weight.T)
    assert torch.allclose(added, expected, atol=1e-5)
    assert not torch.allclose(added, plain)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_preset_runs(engine, method):
    cond = engine.encode_identity(_identity(0))
    result = engine("a portrait", cond, method=method, steps=2, height=64, width=64, seed=3, output_type="latent",
                    progress=False)
    assert torch.isfinite(result.latents).all() and result.latents.shape == (1, 4, 8, 8)
    meta = result.metadata[0]
    assert meta["adapter"] == engine.adapter.spec.name and meta["method"] == method
    assert meta["identity"]["num_zero"] == engine.adapter.spec.options["num_zero"]


def test_per_call_zero_tokens_and_projection(engine):
    kwargs = dict(method="none", steps=2, height=64, width=64, seed=3, output_type="latent", progress=False)
    default = engine("a portrait", _identity(0), **kwargs)
    plain = engine("a portrait", _identity(0), adapter_options={"num_zero": 0, "ortho": "off"}, **kwargs)
    assert plain.metadata[0]["identity"]["num_zero"] == 0 and plain.metadata[0]["identity"]["ortho"] == "off"
    assert not torch.allclose(default.latents, plain.latents)
    context = engine.adapter.attention_kwargs(torch.zeros(1, 3, 64), scale=0.8, step=0, attention=None,
                                              conditioning=engine.encode_identity(_identity(0), num_zero=4))
    assert context["ip_hidden_states"].num_zero == 4
    assert context["ip_hidden_states"].ortho == engine.adapter.spec.options["ortho"]
    with pytest.raises(ConfigError, match="num_zero must be an integer"):
        engine.encode_identity(_identity(0), num_zero=-1)
    with pytest.raises(ConfigError, match="unknown option.*pose.*num_zero, ortho"):
        engine.encode_identity(_identity(0), pose="x")


def test_the_identity_and_the_id_scale_matter(engine):
    kwargs = dict(method="fastface", steps=2, height=64, width=64, seed=3, output_type="latent", progress=False)
    one, other = engine.encode_identity(_identity(0)), engine.encode_identity(_identity(1))
    a, b = engine("a portrait", one, **kwargs).latents, engine("a portrait", other, **kwargs).latents
    assert not torch.allclose(a, b)
    # at id scale 0 the identity enters nowhere
    a0 = engine("a portrait", one, ip_scale=0.0, **kwargs).latents
    b0 = engine("a portrait", other, ip_scale=0.0, **kwargs).latents
    assert torch.equal(a0, b0) and not torch.allclose(a0, a)


def test_official_recipe_is_a_configuration():
    from fastface.config import GenerationConfig

    resolved = GenerationConfig(prompts=("x",), backbone="lightning-4", adapter="pulid", method="none",
                                scheduler="dpm++2m-trailing", cfg_scale=1.2,
                                adapter_options={"num_zero": 8}).validate()
    assert resolved.backbone.scheduler == "DPMSolverMultistepScheduler"
    assert dict(resolved.backbone.scheduler_kwargs) == {"timestep_spacing": "trailing"}
    assert (resolved.guidance.alpha, resolved.guidance.beta, resolved.guidance.rescale) == (1.2, 1.2, 0.0)
    assert resolved.config.pipeline_kwargs()["scheduler"] == "dpm++2m-trailing"
    with pytest.raises(ConfigError, match="unknown scheduler 'euler-x'"):
        GenerationConfig(prompts=("x",), backbone="tiny", scheduler="euler-x").validate()
    with pytest.raises(ConfigError, match="cfg_scale"):
        GenerationConfig(prompts=("x",), backbone="tiny", cfg_scale=-1.0).validate()
    with pytest.raises(ConfigError, match="unknown option"):
        GenerationConfig(prompts=("x",), backbone="tiny", adapter="pulid", adapter_options={"pose": 1}).validate()
