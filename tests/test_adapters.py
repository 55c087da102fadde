"""Adapter registry, checkpoint loading into a UNet, LoRA conversion, identity tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from fastface.adapters import (
    ADAPTERS,
    ID_LORA_ADAPTER,
    get_adapter,
    load_adapter,
    spec_for_backbone,
)
from fastface.backbones import load_backbone
from fastface.errors import ConfigError, InputError, MissingWeightsError
from fastface.faces.types import Identity
from fastface.testing import FACEID_FILE, FACEID_PLUS_FILE


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    pipe = load_backbone("tiny", device="cpu")
    return pipe, load_adapter(pipe, "faceid", backbone="tiny")


def test_registry():
    faceid, plus = ADAPTERS["faceid"], ADAPTERS["faceid-plusv2"]
    assert (faceid.repo, faceid.weight_name, faceid.embedding_dim) == (
        "h94/IP-Adapter-FaceID", "ip-adapter-faceid_sdxl.bin", 512)
    assert plus.weight_name == "ip-adapter-faceid-plusv2_sdxl.bin"
    assert plus.image_encoder == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" and plus.shortcut_scale == 1.0
    assert "non-commercial" in faceid.licence[0]
    tiny = spec_for_backbone("faceid-plusv2", "tiny")
    assert (tiny.embedding_dim, tiny.face_backend, tiny.weight_name) == (128, "dlib", FACEID_PLUS_FILE)
    with pytest.raises(ConfigError, match="unknown adapter 'photomaker'.*faceid, faceid-plusv2, plus-face, "
                       "faceid-portrait, faceid-portrait-unnorm, instantid"):
        get_adapter("photomaker")


def test_missing_adapter_offline_names_repo_and_file(tiny_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir / "backbone")
    with pytest.raises(MissingWeightsError, match="ip-adapter-faceid_sdxl.bin.*h94/IP-Adapter-FaceID"):
        load_adapter(pipe, "faceid", backbone="sdxl")


def test_checkpoint_of_the_other_kind_is_refused(tiny_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir / "backbone")
    with pytest.raises(InputError, match="FaceID-Plus checkpoint, which the faceid adapter cannot use"):
        load_adapter(pipe, "faceid", backbone="tiny", path=tiny_dir / FACEID_PLUS_FILE)


def test_loading_detaches_projection_and_converts_the_lora(loaded, tiny_dir):
    pipe, adapter = loaded
    unet = pipe.unet
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None
    assert adapter.embedding_dim == 128
    # The checkpoint's LoRA lands on every attention projection, self- and cross-attention alike,
    # with the values of the checkpoint (PEFT scale 1: lora_alpha = r).
    state = torch.load(tiny_dir / FACEID_FILE, weights_only=True)["ip_adapter"]
    names = [n for n in unet.attn_processors]
    for index in (0, 1, len(names) - 1):
        module = unet.get_submodule(names[index].removesuffix(".processor"))
        for proj, target in (("to_q", module.to_q), ("to_k", module.to_k), ("to_out", module.to_out[0])):
            torch.testing.assert_close(target.lora_A[ID_LORA_ADAPTER].weight, state[f"{index}.{proj}_lora.down.weight"])
            torch.testing.assert_close(target.lora_B[ID_LORA_ADAPTER].weight, state[f"{index}.{proj}_lora.up.weight"])
            assert target.scaling[ID_LORA_ADAPTER] == 1.0
    # to_k_ip/to_v_ip of the cross-attention layers (odd indices) come from the checkpoint.
    processor = unet.attn_processors[names[1]]
    torch.testing.assert_close(processor.to_k_ip[0].weight, state["1.to_k_ip.weight"])


def test_wrong_embedding_size_is_a_clear_error(loaded):
    _, adapter = loaded
    with pytest.raises(InputError, match=r"the faceid adapter expects 128-d embeddings, got 512-d"):
        adapter.encode(Identity.from_embeddings(np.ones(512, np.float32)))


def test_identity_tokens_follow_the_faceid_projection(loaded):
    _, adapter = loaded
    rows = np.random.default_rng(3).normal(size=(2, 128)).astype(np.float32)
    identity = Identity.from_embeddings(rows)
    tokens = adapter.encode(identity)
    with torch.no_grad():
        expected = adapter.projection(torch.from_numpy(identity.embedding)[None])
        null = adapter.projection(torch.zeros(1, 128))
    torch.testing.assert_close(tokens.cond, expected)
    torch.testing.assert_close(tokens.null, null)
    assert float(null.abs().max()) > 0  # biases: the null identity is not zero tokens
    concat = adapter.encode(identity, mode="concat")
    with torch.no_grad():
        per_photo = adapter.projection(torch.from_numpy(identity.embeddings))
    torch.testing.assert_close(concat.cond, per_photo.reshape(1, 8, -1))
    with pytest.raises(ConfigError, match="identity_mode"):
        adapter.encode(identity, mode="sum")


def test_faceid_plus_needs_crops_and_uses_them(tiny_dir):
    pipe = load_backbone("tiny", device="cpu")
    adapter = load_adapter(pipe, "faceid-plusv2", backbone="tiny")
    vector = np.random.default_rng(4).normal(size=128).astype(np.float32)
    with pytest.raises(InputError, match="needs the aligned face crops"):
        adapter.encode(Identity.from_embeddings(vector))
    rng = np.random.default_rng(5)
    crops = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(2)]
    identity = Identity.from_embeddings(vector)
    first = adapter.encode(Identity(identity.embedding, identity.embeddings, crops=crops[:1]))
    second = adapter.encode(Identity(identity.embedding, identity.embeddings, crops=crops[1:]))
    assert (first.cond - second.cond).abs().max() > 1e-4  # the crop reaches the tokens
    torch.testing.assert_close(first.null, second.null)  # the null identity does not depend on it
    assert pipe.image_encoder is adapter.image_encoder


def test_damaged_safetensors_checkpoint_is_one_clear_error(loaded, tmp_path):
    pipe, _ = loaded
    bad = tmp_path / "adapter.safetensors"
    bad.write_bytes(b"\xff" * 8 + b"not a header")  # a header length far beyond the file
    with pytest.raises(InputError, match=r"cannot read adapter checkpoint '.*adapter.safetensors'"):
        load_adapter(pipe, "faceid", backbone="tiny", path=bad)
