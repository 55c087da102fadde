"""FastFacePipeline on the tiny SDXL: equivalence with stock diffusers, branch plan, batching, state."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from fastface.attention import AttentionManipulation
from fastface.backbones import DISTILL_ADAPTER
from fastface.faces.types import Identity
from fastface.guidance import GuidanceConfig
from fastface.pipeline import FastFacePipeline
from fastface.processors import FastFaceIPAttnProcessor, installed
from fastface.testing import DISTILL_LORA_FILE, FACEID_FILE, FACEID_PLUS_FILE

PROMPT = "a photo of a person"




@pytest.fixture(scope="module")
def faceid(tiny_dir):
    return FastFacePipeline.from_pretrained("tiny", "faceid", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def plus(tiny_dir):
    return FastFacePipeline.from_pretrained("tiny", "faceid-plusv2", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def embedding():
    vector = torch.randn(128, generator=torch.Generator().manual_seed(7))
    return vector / vector.norm()


@pytest.fixture(scope="module")
def crop():
    return np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)


def _stock(tiny_dir, weight_name: str, image_encoder: str | None) -> StableDiffusionXLPipeline:
    """diffusers' own pipeline, adapter loaded its own way (its FaceID LoRA as "faceid_0")."""
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_dir / "backbone")
    stock.load_lora_weights(str(tiny_dir / DISTILL_LORA_FILE), adapter_name="distill")
    stock.load_ip_adapter(str(tiny_dir), subfolder="", weight_name=weight_name, image_encoder_folder=image_encoder)
    # load_ip_adapter leaves only its own LoRA active; the backbone needs both.
    stock.set_adapters(["distill", "faceid_0"], adapter_weights=[1.0, 1.0])
    stock.scheduler = EulerDiscreteScheduler.from_config(stock.scheduler.config, timestep_spacing="trailing")
    stock.set_progress_bar_config(disable=True)
    return stock


def _stock_latents(stock, image_embeds, guidance_scale: float, seed: int, scale: float) -> torch.Tensor:
    stock.set_ip_adapter_scale(scale)
    return stock(
        PROMPT,
        ip_adapter_image_embeds=[image_embeds],
        guidance_scale=guidance_scale,
        num_inference_steps=4,
        height=64,
        width=64,
        generator=[torch.Generator().manual_seed(seed)],
        output_type="latent",
    ).images


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(expected.abs().max()))


def _latents(pipe, face, **kwargs) -> torch.Tensor:
    kwargs.setdefault("seed", 3)
    return pipe(PROMPT, face, output_type="latent", progress=False, **kwargs).latents


# -- equivalence with stock diffusers ------------------------------------------------------------


# diffusers' own adapter loading adds a second PEFT adapter, which PEFT warns about.
stock_warning = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")


@stock_warning
def test_method_none_equals_stock_faceid(tiny_dir, faceid, embedding):
    stock = _stock(tiny_dir, FACEID_FILE, None)
    expected = _stock_latents(stock, embedding.view(1, 1, -1), 1.0, seed=3, scale=0.7)
    ours = _latents(faceid, embedding, method="none", ip_scale=0.7)
    _close(ours, expected)

    # Constant α = β = w without rescale is stock CFG with the zero negative prompt and the null
    # identity (zero embedding) as the negative image embedding.
    negative_first = torch.stack([torch.zeros_like(embedding), embedding]).view(2, 1, -1)
    expected_cfg = _stock_latents(stock, negative_first, 3.0, seed=3, scale=0.7)
    ours_cfg = _latents(
        faceid, embedding, method="none", ip_scale=0.7, guidance=GuidanceConfig(alpha=3.0, beta=3.0, rescale=0.0)
    )
    _close(ours_cfg, expected_cfg)
    assert (expected_cfg - expected).abs().max() > 1e-2  # the CFG comparison is not the plain one again


@stock_warning
def test_method_none_equals_stock_faceid_plus(tiny_dir, plus, embedding, crop):
    stock = _stock(tiny_dir, FACEID_PLUS_FILE, "image_encoder")
    # Stock FaceID-Plus: CLIP features through diffusers' own processor and encoder, set on the projection.
    pixels = stock.feature_extractor(crop, return_tensors="pt").pixel_values
    with torch.no_grad():
        clip = stock.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
    projection = stock.unet.encoder_hid_proj.image_projection_layers[0]
    projection.clip_embeds, projection.shortcut = clip[None], True
    expected = _stock_latents(stock, embedding.view(1, 1, -1), 1.0, seed=4, scale=0.9)

    identity = Identity(embedding=embedding.numpy(), embeddings=embedding.numpy()[None], crops=[crop])
    ours = _latents(plus, identity, method="none", ip_scale=0.9, seed=4)
    _close(ours, expected)


# -- branch plan and evaluation counts -------------------------------------------------------------


def _count_samples(pipe, **kwargs) -> tuple[int, dict]:
    sizes: list[int] = []
    hook = pipe.sdxl.unet.register_forward_pre_hook(lambda module, args: sizes.append(int(args[0].shape[0])))
    try:
        result = pipe([PROMPT, "a portrait"], kwargs.pop("face"), output_type="latent", progress=False, **kwargs)
    finally:
        hook.remove()
    return sum(sizes), result.metadata[0], len(sizes)


def test_unet_evaluations_match_the_plan_and_the_metadata(faceid, embedding):
    samples, meta, calls = _count_samples(faceid, face=embedding, method="fastface", steps=4)
    assert meta["unet_evaluations"] == 10
    assert samples == 10 * 2 and calls == 4  # two images, one batched UNet call per step

    guided = GuidanceConfig(rescale_on="guided")
    samples, meta, calls = _count_samples(faceid, face=embedding, method="fastface", steps=4, guidance=guided)
    assert meta["unet_evaluations"] == 8
    assert samples == 8 * 2 and calls == 4

    samples, meta, _ = _count_samples(faceid, face=embedding, method="none", steps=4)
    assert meta["unet_evaluations"] == 4 and samples == 4 * 2


def test_no_adapter_pipeline_deduplicates_identity_branches(tiny_dir):
    pipe = FastFacePipeline.from_pretrained("tiny", None, device="cpu")
    sizes: list[int] = []
    hook = pipe.sdxl.unet.register_forward_pre_hook(lambda module, args: sizes.append(int(args[0].shape[0])))
    try:
        result = pipe(PROMPT, method="dcg", output_type="latent", progress=False)
    finally:
        hook.remove()
    # Without identity, "id" is "null" and "full" is "text": the plan's 3 branches of steps 1-2 and
    # 2 of steps 0 and 3 (kept for the rescale) come down to 2 distinct conditions each.
    assert sizes == [2, 2, 2, 2]
    assert result.metadata[0]["unet_evaluations"] == 8
    assert result.metadata[0]["identity"] is None
    assert installed(pipe.sdxl.unet) == {}


# -- batching, seeds, independence of calls and pipelines ----------------------------------------------


@pytest.mark.parametrize("method", ["fastface", "fastface-softmask"])
def test_image_in_a_batch_equals_the_same_seed_alone(faceid, embedding, method):
    batch = faceid(
        [PROMPT, "a portrait"], embedding, method=method, num_images_per_prompt=2, seed=[11, 12, 13, 14],
        output_type="latent", progress=False,
    )
    alone = faceid("a portrait", embedding, method=method, seed=13, output_type="latent", progress=False)
    _close(batch.latents[2:3], alone.latents, rel=1e-4)
    assert [m["seed"] for m in batch.metadata] == [11, 12, 13, 14]
    assert [m["prompt"] for m in batch.metadata] == [PROMPT, PROMPT, "a portrait", "a portrait"]
    assert (batch.latents[0] - batch.latents[1]).abs().max() > 1e-2  # seeds really differ


def test_integer_seed_counts_up(faceid, embedding):
    batch = faceid(PROMPT, embedding, num_images_per_prompt=2, seed=20, output_type="latent", progress=False)
    second = faceid(PROMPT, embedding, seed=21, output_type="latent", progress=False)
    _close(batch.latents[1:], second.latents, rel=1e-4)


def test_two_pipelines_do_not_affect_each_other(faceid, plus, embedding, crop):
    identity = Identity(embedding=embedding.numpy(), embeddings=embedding.numpy()[None], crops=[crop])
    first = _latents(faceid, embedding, method="fastface", seed=5)
    other = _latents(plus, identity, method="fastface-softmask", ip_scale=1.0, lora_scale=0.3, seed=5)
    again = _latents(faceid, embedding, method="fastface", seed=5)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert (other - first).abs().max() > 1e-3
    shared = {id(p) for p in faceid.sdxl.unet.parameters()} & {id(p) for p in plus.sdxl.unet.parameters()}
    assert not shared


def test_a_call_that_fails_midway_leaves_the_next_call_correct(faceid, embedding):
    expected = _latents(faceid, embedding, method="fastface-softmask", seed=9)

    def explode(step: int, latents: torch.Tensor) -> None:
        if step == 2:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        faceid(PROMPT, embedding, method="fastface", ip_scale=1.3, lora_scale=0.0, seed=1,
               callback=explode, progress=False)
    after = _latents(faceid, embedding, method="fastface-softmask", seed=9)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_reusable_prompt_and_identity_encodings(faceid, embedding):
    direct = _latents(faceid, embedding, method="fastface", seed=2)
    embeds = faceid.encode_prompt(PROMPT)
    tokens = faceid.encode_identity(embedding)
    reused = faceid(None, prompt_embeds=embeds, identity_tokens=tokens, method="fastface", seed=2,
                    output_type="latent", progress=False).latents
    torch.testing.assert_close(reused, direct, rtol=0, atol=0)
    as_face = faceid(PROMPT, tokens, method="fastface", seed=2, output_type="latent", progress=False).latents
    torch.testing.assert_close(as_face, direct, rtol=0, atol=0)


def test_negative_prompt_replaces_the_zero_null_text(faceid, embedding):
    zero = faceid.encode_prompt(PROMPT)
    assert float(zero.null.abs().max()) == 0.0 and float(zero.null_pooled.abs().max()) == 0.0
    negative = faceid.encode_prompt(PROMPT, negative_prompt="blurry")
    assert float(negative.null.abs().max()) > 0.0
    plain = _latents(faceid, embedding, method="dcg")
    with_negative = _latents(faceid, embedding, method="dcg", negative_prompt="blurry")
    assert (plain - with_negative).abs().max() > 1e-4
    assert faceid(PROMPT, embedding, negative_prompt="blurry", output_type="latent",
                  progress=False).metadata[0]["negative_prompt"] == "blurry"


# -- attention manipulation ---------------------------------------------------------------------------


def _trajectory(pipe, face, **kwargs) -> list[torch.Tensor]:
    steps: list[torch.Tensor] = []
    pipe(PROMPT, face, output_type="latent", progress=False, seed=6,
         callback=lambda k, latents: steps.append(latents.clone()), **kwargs)
    return steps


def test_am_acts_exactly_at_its_targeted_steps(faceid, embedding):
    plain = _trajectory(faceid, embedding, method="dcg")
    last_only = _trajectory(faceid, embedding, method="dcg",
                            attention=AttentionManipulation.scale_power(steps=[3]))
    for k in range(3):
        torch.testing.assert_close(last_only[k], plain[k], rtol=0, atol=0)
    assert (last_only[3] - plain[3]).abs().max() > 1e-4


def test_am_touches_only_the_identity_branch(faceid, embedding):
    # With λ = 0 the identity branch is off, so AM (which only changes that branch) changes nothing.
    off = _latents(faceid, embedding, method="dcg", ip_scale=0.0)
    off_am = _latents(faceid, embedding, method="fastface", ip_scale=0.0)
    torch.testing.assert_close(off_am, off, rtol=0, atol=0)
    on = _latents(faceid, embedding, method="dcg")
    on_am = _latents(faceid, embedding, method="fastface")
    assert (on_am - on).abs().max() > 1e-4


def test_am_acts_only_in_its_targeted_part(faceid, embedding):
    unet = faceid.sdxl.unet
    captured: dict[str, list[torch.Tensor]] = {"down": [], "mid": [], "up": []}
    hooks = [
        unet.down_blocks[1].register_forward_hook(lambda m, a, out: captured["down"].append(out[0].clone())),
        unet.mid_block.register_forward_hook(lambda m, a, out: captured["mid"].append(out.clone())),
        unet.up_blocks[0].register_forward_hook(lambda m, a, out: captured["up"].append(out.clone())),
    ]
    try:
        faceid(PROMPT, embedding, method="dcg", steps=1, progress=False, output_type="latent")
        plain = {part: values.pop() for part, values in captured.items()}
        up_only = AttentionManipulation.scale_power(parts=["up"])
        faceid(PROMPT, embedding, method="dcg", attention=up_only, steps=1, progress=False, output_type="latent")
        manipulated = {part: values.pop() for part, values in captured.items()}
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(manipulated["down"], plain["down"], rtol=0, atol=0)
    torch.testing.assert_close(manipulated["mid"], plain["mid"], rtol=0, atol=0)
    assert (manipulated["up"] - plain["up"]).abs().max() > 1e-5


def test_mid_part_is_manipulated_when_asked(faceid, embedding):
    plain = _latents(faceid, embedding, method="dcg")
    mid = _latents(faceid, embedding, method="dcg", attention=AttentionManipulation.scale_power(parts=["mid"]))
    assert (mid - plain).abs().max() > 1e-5
    parts = {p.part for p in installed(faceid.sdxl.unet).values()}
    assert parts == {"down", "mid", "up"}


# -- LoRAs ------------------------------------------------------------------------------------------------


def test_distillation_and_adapter_loras_are_both_active(faceid, embedding):
    layer = faceid.sdxl.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k
    base = _latents(faceid, embedding, method="none")
    assert set(layer.active_adapters) == {DISTILL_ADAPTER, "fastface_id"}
    without_id_lora = _latents(faceid, embedding, method="none", lora_scale=0.0)
    faceid.set_lora_weights({DISTILL_ADAPTER: 0.0})
    try:
        without_distill = _latents(faceid, embedding, method="none")
    finally:
        faceid.set_lora_weights({DISTILL_ADAPTER: 1.0})
    assert (without_id_lora - base).abs().max() > 1e-4
    assert (without_distill - base).abs().max() > 1e-4
    torch.testing.assert_close(_latents(faceid, embedding, method="none"), base, rtol=0, atol=0)


# -- processors and modules -------------------------------------------------------------------------------


def test_processors_share_weights_and_are_removable(tiny_dir, embedding):
    pipe = FastFacePipeline.from_pretrained("tiny", "faceid", device="cpu")
    unet = pipe.sdxl.unet
    ours = installed(unet)
    assert len(ours) == 12 and all(isinstance(p, FastFaceIPAttnProcessor) for p in ours.values())
    assert unet.encoder_hid_proj is None  # identity tokens come precomputed
    before = sum(p.numel() for p in unet.parameters())
    pipe.unload()
    assert installed(unet) == {}
    assert not any("ip" in type(p).__name__.lower() for p in unet.attn_processors.values())
    assert "fastface_id" not in unet.peft_config
    assert sum(p.numel() for p in unet.parameters()) < before


def test_a_call_emits_no_warnings(faceid, embedding, caplog):
    # In particular none of diffusers' "cross_attention_kwargs [...] are not expected by ..." for
    # the self-attention processors, which receive the identity context too.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with caplog.at_level(logging.WARNING):
            faceid(PROMPT, embedding, method="fastface-softmask", output_type="pil", progress=False)
    # NumPy-2 DeprecationWarnings raised inside diffusers' schedulers are not ours to fix.
    assert [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# -- outputs and metadata -----------------------------------------------------------------------------------


def test_pil_output_and_metadata(faceid, embedding):
    result = faceid([PROMPT], embedding, method="fastface", num_images_per_prompt=2, seed=1, progress=False)
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    assert result.latents.shape == (2, 4, 8, 8)
    meta = result.metadata[1]
    assert meta["seed"] == 2 and meta["backbone"] == "tiny" and meta["adapter"] == "faceid"
    assert meta["method"] == "fastface" and meta["attention"]["mode"] == "scale-power"
    assert meta["guidance"]["rescale"] == 0.75 and meta["steps"] == 4
    assert [s["alpha"] for s in meta["schedule"]] == [1.0, 1.5, 1.5, 1.0]
    assert meta["identity"]["dim"] == 128 and meta["identity"]["num_tokens"] == 4
    assert set(meta["timings_ms"]) == {"identity", "prompt", "setup", "identity_kv", "denoise", "decode", "total"}
    assert meta["timings_ms"]["setup"] >= meta["timings_ms"]["identity_kv"] > 0  # a part of the set-up stage
    assert meta["timings_ms"]["total"] >= meta["timings_ms"]["denoise"] > 0
    assert {"fastface", "torch", "diffusers", "transformers", "peft"} <= set(meta["versions"])
    assert set(meta["licence"]) == {"backbone", "adapter", "face_model"}
    assert meta["ip_scale"] == 0.8 and meta["lora_scale"] == 1.0


def test_concat_identity_mode_gives_four_tokens_per_photo(faceid):
    rows = torch.randn(3, 128, generator=torch.Generator().manual_seed(1)).numpy()
    identity = Identity.from_embeddings(rows)
    concat = faceid.encode_identity(identity, mode="concat")
    mean = faceid.encode_identity(identity, mode="mean")
    assert concat.cond.shape[1] == 12 and concat.null.shape[1] == 12 and mean.cond.shape[1] == 4
    result = faceid(PROMPT, identity, identity_mode="concat", output_type="latent", progress=False)
    assert result.metadata[0]["identity"]["num_tokens"] == 12


def test_real_photo_through_the_dlib_backend(plus, tmp_path):
    pytest.importorskip("dlib")
    from PIL import Image
    from skimage import data

    path = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    result = plus(PROMPT, str(path), method="fastface", output_type="latent", progress=False)
    identity = result.metadata[0]["identity"]
    assert identity["backend"] == "dlib" and identity["dim"] == 128 and identity["sources"] == [str(path)]
    assert "Boost" in result.metadata[0]["licence"]["face_model"]
