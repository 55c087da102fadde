"""Plus-Face, FaceID-Portrait and InstantID on the tiny SDXL: loading from the original key layouts,
equivalence with diffusers' own components, branch plans and evaluation counts, AM, pose control."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, EulerDiscreteScheduler, StableDiffusionXLPipeline

from fastface import tiny_adapters
from fastface.adapters import ADAPTERS, load_adapter
from fastface.attention import AttentionManipulation
from fastface.backbones import load_backbone
from fastface.errors import InputError
from fastface.faces.types import Identity, Pose
from fastface.guidance import GuidanceConfig
from fastface.keypoint_image import control_tensor, draw_keypoints
from fastface.pipeline import FastFacePipeline

PROMPT = "a photo of a person"
NEGATIVE = "blurry"
SIZE = 64
KPS = np.array([[20, 24], [44, 24], [32, 36], [22, 48], [42, 48]], dtype=np.float32)


def _identity(n: int = 1, seed: int = 0) -> Identity:
    """n photos' worth of identity: raw 128-d embeddings, crops, keypoints on a 64 x 64 photo."""
    rng = np.random.default_rng(seed)
    raw = (rng.normal(size=(n, 128)) * 3).astype(np.float32)
    rows = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    mean = rows.mean(axis=0)
    return Identity(
        embedding=(mean / np.linalg.norm(mean)).astype(np.float32), embeddings=rows, raw_embeddings=raw,
        crops=[rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)],
        keypoints=[KPS + 2 * i for i in range(n)], image_sizes=[(SIZE, SIZE)] * n,
    )


@pytest.fixture(scope="module")
def pipes(tiny_dir):
    return {name: FastFacePipeline.from_pretrained("tiny", name, device="cpu", dtype=torch.float32)
            for name in ("plus-face", "faceid-portrait", "faceid-portrait-unnorm", "instantid")}


def _latents(pipe, face, **kwargs) -> torch.Tensor:
    kwargs.setdefault("seed", 3)
    kwargs.setdefault("steps", 4)
    return pipe(PROMPT, face, output_type="latent", progress=False, height=SIZE, width=SIZE, **kwargs).latents


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(expected.abs().max()))


CFG5 = GuidanceConfig(alpha=5.0, beta=5.0, rescale=0.0)


# -- loading from the original key layouts -------------------------------------------------------------


def _reference_resampler(state: dict, x: torch.Tensor) -> torch.Tensor:
    """The IP-Adapter Resampler computed straight from the original checkpoint keys (64-d heads)."""

    def norm(v, key):
        return F.layer_norm(v, v.shape[-1:], state[f"{key}.weight"], state[f"{key}.bias"])

    latents = state["latents"].repeat(x.shape[0], 1, 1)
    x = F.linear(x, state["proj_in.weight"], state["proj_in.bias"])
    layer = 0
    while f"layers.{layer}.0.to_q.weight" in state:
        a, f = f"layers.{layer}.0", f"layers.{layer}.1"
        xs, ls = norm(x, f"{a}.norm1"), norm(latents, f"{a}.norm2")
        q = F.linear(ls, state[f"{a}.to_q.weight"])
        k, v = F.linear(torch.cat([xs, ls], dim=1), state[f"{a}.to_kv.weight"]).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (-1, 64)).transpose(1, 2) for t in (q, k, v))  # 64-d heads
        weights = (q @ k.transpose(-1, -2) / 8.0).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).flatten(2)
        latents = F.linear(out, state[f"{a}.to_out.weight"]) + latents
        hidden = F.gelu(F.linear(norm(latents, f"{f}.0"), state[f"{f}.1.weight"]))
        latents = F.linear(hidden, state[f"{f}.3.weight"]) + latents
        layer += 1
    return norm(F.linear(latents, state["proj_out.weight"], state["proj_out.bias"]), "norm_out")


@pytest.mark.parametrize("name", ["plus-face", "faceid-portrait-unnorm", "instantid"])
def test_resampler_is_loaded_from_the_original_keys(pipes, name):
    adapter = pipes[name].adapter
    state = torch.load(adapter.checkpoint, weights_only=True)["image_proj"]
    assert state["layers.0.0.to_q.weight"].shape[0] == 128  # two 64-d heads: the head split is exercised
    assert (state["layers.0.0.norm1.weight"] - 1).abs().max() > 0.05  # LayerNorms are perturbed
    width = state["proj_in.weight"].shape[1]
    x = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _close(adapter.projection(x), _reference_resampler(state, x), rel=1e-5)
    assert adapter.tokens_per_photo == 16


def test_portrait_variant_comes_from_the_keys_not_the_file_name(tiny_dir, tmp_path, pipes):
    assert pipes["faceid-portrait"].adapter.variant == "normed"
    assert pipes["faceid-portrait-unnorm"].adapter.variant == "unnorm"
    pipe = load_backbone("tiny", device="cpu")
    # wrong checkpoints are refused before anything is installed into the pipeline
    with pytest.raises(InputError, match="FaceID checkpoint \\(with LoRA\\)"):
        load_adapter(pipe, "faceid-portrait", backbone="tiny", path=tiny_dir / "ip-adapter-faceid_sdxl.bin")
    with pytest.raises(InputError, match="not an IP-Adapter Plus checkpoint"):
        load_adapter(pipe, "plus-face", backbone="tiny", path=tiny_dir / tiny_adapters.PORTRAIT_FILE)
    misleading = tmp_path / "ip-adapter-faceid-portrait_sdxl.bin"
    shutil.copy(tiny_dir / tiny_adapters.PORTRAIT_UNNORM_FILE, misleading)
    assert load_adapter(pipe, "faceid-portrait", backbone="tiny", path=misleading).variant == "unnorm"


def test_identitynet_is_not_silent(tiny_dir):
    controlnet = ControlNetModel.from_pretrained(tiny_dir / tiny_adapters.INSTANTID_DIR / tiny_adapters.CONTROLNET_DIR)
    for conv in [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks,
                 controlnet.controlnet_mid_block]:
        assert conv.weight.abs().min() > 0 or conv.weight.abs().max() > 1e-2


# -- equivalence with diffusers' own components ------------------------------------------------------------


def _stock(tiny_dir, weight_name: str, image_encoder: str | None = None) -> StableDiffusionXLPipeline:
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_dir / "backbone")
    stock.load_lora_weights(str(tiny_dir / "tiny-distill-lora.safetensors"), adapter_name="distill")
    stock.load_ip_adapter(str(tiny_dir), subfolder="", weight_name=weight_name, image_encoder_folder=image_encoder)
    stock.scheduler = EulerDiscreteScheduler.from_config(stock.scheduler.config, timestep_spacing="trailing")
    stock.set_progress_bar_config(disable=True)
    return stock


def _stock_latents(stock, image_embeds, guidance_scale: float, scale: float) -> torch.Tensor:
    stock.set_ip_adapter_scale(scale)
    return stock(PROMPT, negative_prompt=NEGATIVE, ip_adapter_image_embeds=[image_embeds],
                 guidance_scale=guidance_scale, num_inference_steps=4, height=SIZE, width=SIZE,
                 generator=[torch.Generator().manual_seed(3)], output_type="latent").images


def test_plus_face_equals_stock_diffusers(tiny_dir, pipes):
    identity = _identity()
    stock = _stock(tiny_dir, tiny_adapters.PLUS_FACE_FILE, "image_encoder")
    pixels = stock.feature_extractor(identity.crops[0], return_tensors="pt").pixel_values
    with torch.no_grad():
        hidden = stock.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
        null = stock.image_encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
    pipe = pipes["plus-face"]
    ours = _latents(pipe, identity, method="none", ip_scale=0.8, negative_prompt=NEGATIVE)
    _close(ours, _stock_latents(stock, hidden[None], 1.0, 0.8))
    ours_cfg = _latents(pipe, identity, method="none", ip_scale=0.8, negative_prompt=NEGATIVE, guidance=CFG5)
    _close(ours_cfg, _stock_latents(stock, torch.stack([null, hidden]), 5.0, 0.8))


@pytest.mark.parametrize("name", ["faceid-portrait", "faceid-portrait-unnorm"])
def test_portrait_equals_stock_diffusers(tiny_dir, pipes, name):
    identity = _identity()
    file = tiny_adapters.PORTRAIT_FILE if name == "faceid-portrait" else tiny_adapters.PORTRAIT_UNNORM_FILE
    stock = _stock(tiny_dir, file)
    vector = torch.from_numpy(identity.embeddings if name == "faceid-portrait" else identity.raw_embeddings)
    # diffusers' image embeds: (batch, images, D) for the MLP, (batch, images, tokens, D) for a Resampler
    shape = (-1, 1, 128) if name == "faceid-portrait" else (-1, 1, 1, 128)
    ours = _latents(pipes[name], identity, method="none", ip_scale=0.8, negative_prompt=NEGATIVE)
    _close(ours, _stock_latents(stock, vector.view(shape), 1.0, 0.8))
    ours_cfg = _latents(pipes[name], identity, method="none", ip_scale=0.8, negative_prompt=NEGATIVE, guidance=CFG5)
    both = torch.stack([torch.zeros_like(vector), vector]).view(shape)
    _close(ours_cfg, _stock_latents(stock, both, 5.0, 0.8))


def _reference_instantid(tiny_dir, identity: Identity, guidances: tuple[float, ...], ip_scale: float,
                         cn_scale: float) -> list[torch.Tensor]:
    """InstantID's sampling written out with diffusers components: the IdentityNet's context is the
    identity tokens (∅: Resampler of zeros), its image the keypoints, in both CFG halves."""
    folder = tiny_dir / tiny_adapters.INSTANTID_DIR
    stock = _stock(tiny_dir, f"{tiny_adapters.INSTANTID_DIR}/{tiny_adapters.INSTANTID_FILE}")
    stock.set_ip_adapter_scale(ip_scale)
    controlnet = ControlNetModel.from_pretrained(folder / tiny_adapters.CONTROLNET_DIR)
    projection = stock.unet.encoder_hid_proj.image_projection_layers[0]
    stock.unet.encoder_hid_proj = None  # tokens handed in as diffusers' (text, [ip tokens]) pair
    return [_reference_sampling(stock, controlnet, projection, identity, g, cn_scale) for g in guidances]


def _reference_sampling(stock, controlnet, projection, identity: Identity, guidance: float, cn_scale: float):
    from diffusers.utils.torch_utils import randn_tensor

    unet = stock.unet
    cfg = guidance > 1
    raw = torch.from_numpy(identity.raw_embeddings[:1]).view(1, 1, -1)
    with torch.no_grad():
        tokens = projection(raw)
        if cfg:
            tokens = torch.cat([projection(torch.zeros_like(raw)), tokens])
        text, negative, pooled, negative_pooled = stock.encode_prompt(
            PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=cfg, negative_prompt=NEGATIVE)
        if cfg:
            text, pooled = torch.cat([negative, text]), torch.cat([negative_pooled, pooled])
        time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=text.dtype).repeat(text.shape[0], 1)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        image = control_tensor(draw_keypoints(identity.keypoints[0], identity.image_sizes[0]), SIZE, SIZE)
        image = image.repeat(text.shape[0], 1, 1, 1)
        scheduler = stock.scheduler
        scheduler.set_timesteps(4)
        latents = randn_tensor((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(3))
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents] * text.shape[0]), t)
            down, mid = controlnet(x, t, encoder_hidden_states=tokens, controlnet_cond=image,
                                   conditioning_scale=cn_scale, added_cond_kwargs=added, return_dict=False)
            noise = unet(x, t, encoder_hidden_states=(text, [tokens]), added_cond_kwargs=added,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid,
                         return_dict=False)[0]
            if cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance * (cond - uncond)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
    return latents


def test_instantid_equals_its_sampling_written_with_diffusers(tiny_dir, pipes):
    identity = _identity()
    pipe = pipes["instantid"]
    options = {"controlnet_scale": 0.7}
    plain, cfg = _reference_instantid(tiny_dir, identity, (1.0, 5.0), 0.8, 0.7)
    ours = _latents(pipe, identity, method="none", ip_scale=0.8, negative_prompt=NEGATIVE, adapter_options=options)
    _close(ours, plain)
    ours_cfg = _latents(pipe, identity, method="none", ip_scale=0.8, negative_prompt=NEGATIVE, guidance=CFG5,
                        adapter_options=options)
    _close(ours_cfg, cfg)
    # the IdentityNet matters: without it (scale 0) the result moves
    off = _latents(pipe, identity, method="none", ip_scale=0.8, negative_prompt=NEGATIVE,
                   adapter_options={"controlnet_scale": 0.0})
    assert (off - ours).abs().max() > 1e-3


# -- branch plans, evaluation counts, identity tokens ------------------------------------------------------


@pytest.mark.parametrize("name", ["plus-face", "faceid-portrait", "faceid-portrait-unnorm", "instantid"])
@pytest.mark.parametrize("method", ["fastface", "fastface-softmask", "dcg", "am", "none"])
def test_every_adapter_and_preset_runs_with_the_planned_evaluations(pipes, name, method):
    pipe = pipes[name]
    unet_rows: list[int] = []
    controlnet_rows: list[int] = []
    hooks = [pipe.sdxl.unet.register_forward_pre_hook(lambda m, a: unet_rows.append(int(a[0].shape[0])))]
    if name == "instantid":
        hooks.append(pipe.adapter.controlnet.register_forward_pre_hook(
            lambda m, a: controlnet_rows.append(int(a[0].shape[0]))))
    try:
        result = pipe(PROMPT, _identity(2), method=method, steps=4, height=SIZE, width=SIZE, output_type="latent",
                      progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    meta = result.metadata[0]
    expected = {"fastface": 10, "fastface-softmask": 10, "dcg": 10, "am": 4, "none": 4}[method]
    assert meta["unet_evaluations"] == expected == sum(unet_rows)
    assert torch.isfinite(result.latents).all()
    tokens = 32 if name.startswith("faceid-portrait") else 16  # Portrait always concatenates its 2 photos
    assert meta["identity"]["num_tokens"] == tokens
    if name == "instantid":
        assert controlnet_rows == unet_rows  # one IdentityNet evaluation per UNet sample, every branch
        assert meta["extra_evaluations"] == {"controlnet": expected}
    else:
        assert meta["extra_evaluations"] == {}
    assert meta["adapter_config"]["presets_tuned"] is False


def test_identitynet_gets_each_branchs_identity_tokens_and_the_same_keypoints(pipes):
    pipe = pipes["instantid"]
    identity = _identity()
    conditioning = pipe.encode_identity(identity)
    seen: list[dict] = []
    hook = pipe.adapter.controlnet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        pipe(PROMPT, identity, method="dcg", steps=4, height=SIZE, width=SIZE, output_type="latent", progress=False)
    finally:
        hook.remove()
    # step 1 runs the three identity-first branches: null (∅), id (I), full (I)
    context = seen[1]["encoder_hidden_states"]
    assert context.shape == (3, 16, conditioning.cond.shape[-1])
    by_row = [conditioning.null[0], conditioning.cond[0], conditioning.cond[0]]
    for row, expected in enumerate(by_row):
        torch.testing.assert_close(context[row], expected)
    image = seen[1]["controlnet_cond"]
    assert torch.equal(image[0], image[2]) and float(image.max()) > 0.5  # ∅ keeps the keypoints


def test_am_changes_only_the_identity_attention(pipes):
    pipe = pipes["instantid"]
    identity = _identity()
    # λ = 0: the identity branch is off in the UNet, so AM has nothing to act on (the IdentityNet,
    # untouched by AM, still runs)
    off = _latents(pipe, identity, method="dcg", ip_scale=0.0)
    torch.testing.assert_close(_latents(pipe, identity, method="fastface", ip_scale=0.0), off, rtol=0, atol=0)
    on = _latents(pipe, identity, method="dcg")
    assert (_latents(pipe, identity, method="fastface") - on).abs().max() > 1e-4
    # targeted part only: up-only AM leaves the down blocks' output of a single step untouched
    unet = pipe.sdxl.unet
    captured: list[torch.Tensor] = []
    hook = unet.down_blocks[1].register_forward_hook(lambda m, a, out: captured.append(out[0].clone()))
    try:
        pipe(PROMPT, identity, method="dcg", steps=1, progress=False, output_type="latent", height=SIZE, width=SIZE)
        pipe(PROMPT, identity, method="dcg", steps=1, progress=False, output_type="latent", height=SIZE, width=SIZE,
             attention=AttentionManipulation.scale_power(parts=["up"]))
    finally:
        hook.remove()
    torch.testing.assert_close(captured[1], captured[0], rtol=0, atol=0)


def test_pose_from_another_photo_changes_only_the_keypoints(pipes):
    pipe = pipes["instantid"]
    identity = _identity()
    pose = Pose(keypoints=KPS[::-1].copy() + 5, size=(SIZE, SIZE))
    plain = pipe.encode_identity(identity)
    posed = pipe.encode_identity(identity, pose=pose)
    torch.testing.assert_close(posed.cond, plain.cond)
    assert not np.array_equal(posed.extras["keypoint_image"], plain.extras["keypoint_image"])
    np.testing.assert_array_equal(posed.extras["keypoint_image"], draw_keypoints(pose.keypoints, pose.size))
    a = _latents(pipe, identity, method="none")
    b = _latents(pipe, identity, method="none", adapter_options={"pose": pose})
    assert (a - b).abs().max() > 1e-4


def test_missing_inputs_are_clear_errors(pipes):
    bare = Identity.from_embeddings(np.ones(128, dtype=np.float32))
    with pytest.raises(InputError, match="aligned face crop"):
        pipes["plus-face"].encode_identity(bare)
    with pytest.raises(InputError, match="keypoints"):
        pipes["instantid"].encode_identity(bare)


def test_registry_and_licences():
    assert ADAPTERS["instantid"].repo == "InstantX/InstantID"
    licence = " ".join(ADAPTERS["instantid"].licence)
    assert "Apache-2.0" in licence and "non-commercial" in licence and "antelopev2" in licence
    assert ADAPTERS["plus-face"].embedding_dim is None
    assert ADAPTERS["faceid-portrait-unnorm"].weight_name.endswith("_unnorm.bin")
    files = [f.filename for f in ADAPTERS["instantid"].required_files()]
    assert files == ["ip-adapter.bin", "ControlNetModel"]


@pytest.mark.parametrize("name", ["plus-face", "instantid"])
def test_seam_adapters_run_the_call_contexts_without_module_walks(pipes, name):
    # Speed II through the seam: FastFace IP processors get CallContexts (identity K/V of every
    # token stack projected together once per call, fused kernel) and the call asks no module tree for its device or dtype.
    import cProfile
    import pstats

    pipe = pipes[name]
    assert pipe._ip_processors and pipe.am_kernel == "fused"
    identity = _identity()
    kwargs = {"method": "fastface", "output_type": "pil", "progress": False}
    pipe(PROMPT, identity, **kwargs)  # warm
    layer = next(iter(pipe._ip_processors.values())).to_k_ip[0]
    calls = []
    handle = layer.register_forward_hook(lambda *_: calls.append(1))
    profile = cProfile.Profile()
    try:
        profile.enable()
        result = pipe(PROMPT, identity, **kwargs)
        profile.disable()
    finally:
        handle.remove()
    names = {key[2] for key in pstats.Stats(profile).stats}
    walks = {"get_parameter_dtype", "get_parameter_device", "_get_top_level_group_offload_hook", "attn_processors"}
    assert not names & walks
    assert len({tuple(p["branches"]) for p in result.metadata[0]["schedule"]}) == 2 and len(calls) == 1  # once per call
