"""Conformance of FastFace's Plus-Face, FaceID-Portrait and InstantID adapters with the official code.

Runs each adapter's OFFICIAL implementation (from checkouts of ``tencent-ailab/IP-Adapter`` and
``instantX-research/InstantID`` that you provide; nothing of theirs is in this repository) and
FastFace on the same tiny random-weight checkpoints in the original key layouts, with method
``none`` and no CFG, and with stock CFG 5, and compares the final latents (max relative difference,
``max|a - b| / max|b|``). The official code runs in a subprocess per adapter (both repositories
ship a package named ``ip_adapter``).

The checkpoints are written by :mod:`fastface.tiny_adapters` with the published Resampler width
1280 (20 heads of 64), because ``IPAdapterPlusXL`` and InstantID's pipeline hard-code it; so the
official classes run unchanged. ``IPAdapterPlusXL`` also hard-codes float16 (CUDA inference): to
compare at 1e-4 on CPU its subprocess aliases ``torch.float16`` to float32 while the class runs.
FaceID-Portrait ``_unnorm`` has no official class: the official ``IPAdapterFaceIDXL`` (separate
variant, ``n_cond`` photos) runs with its projection swapped for the official ``Resampler``, one
input token per photo.

    python benchmarks/conformance_adapters.py --ip-adapter-src /tmp/IP-Adapter \\
        --instantid-src /tmp/InstantID --extra-path /tmp/site   # einops for IP-Adapter's resampler
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ADAPTERS = ("plus-face", "faceid-portrait", "faceid-portrait-unnorm", "instantid")
MODES = {"none": 1.0, "cfg5": 5.0}
PROMPT = "a photo of a person, studio light"
NEGATIVE = "blurry, lowres"
STEPS = 4
SEED = 7
IP_SCALE = 0.8
CONTROLNET_SCALE = 0.8
SIZE = 64
OFFICIAL_RESAMPLER_DIM = 1280


# ---------------------------------------------------------------------------------------------
# Inputs and checkpoints


def write_inputs(folder: Path) -> dict[str, Any]:
    """A real photo analysed with dlib (2 photos for Portrait) and the checkpoints at width 1280."""
    import matplotlib.cbook
    import numpy as np
    import skimage.data
    import torch
    from diffusers import UNet2DConditionModel
    from PIL import Image

    from fastface import tiny_adapters as ta
    from fastface.faces import build_identity
    from fastface.testing import tiny_model_dir

    sdxl = tiny_model_dir()
    photo = skimage.data.astronaut()
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        second = np.asarray(Image.open(fh).convert("RGB"))
    identity = build_identity([photo, second], "dlib", cache=False, progress=False, outlier_threshold=-1.0,
                              reject_threshold=-1.0)
    one = build_identity([photo], "dlib", cache=False, progress=False)
    unet = UNet2DConditionModel.from_pretrained(sdxl / "backbone" / "unet")
    clip_hidden = json.loads((sdxl / "image_encoder" / "config.json").read_text())["hidden_size"]
    dim = identity.dim
    files = {
        "plus-face": ta.plus_face_checkpoint(unet, clip_hidden, dim=OFFICIAL_RESAMPLER_DIM),
        "faceid-portrait": ta.portrait_checkpoint(unet, dim),
        "faceid-portrait-unnorm": ta.portrait_checkpoint(unet, dim, unnorm=True, dim=OFFICIAL_RESAMPLER_DIM),
        "instantid": ta.instantid_checkpoint(unet, dim, dim=OFFICIAL_RESAMPLER_DIM),
    }
    paths = {}
    for name, state in files.items():
        paths[name] = str(folder / name / f"{name}.bin")
        Path(paths[name]).parent.mkdir()
        torch.save(state, paths[name])
    # InstantID's layout: ip-adapter.bin with ControlNetModel/ beside it
    controlnet = folder / "instantid" / "ControlNetModel"
    ta.identitynet(unet).save_pretrained(controlnet, safe_serialization=True)
    inputs = {
        "backbone": str(sdxl / "backbone"),
        "distill_lora": str(sdxl / "tiny-distill-lora.safetensors"),
        "image_encoder": str(sdxl / "image_encoder"),
        "checkpoints": paths,
        "controlnet": str(controlnet),
        "photo": photo,
        "crop": identity.crops[0],
        "embeddings": identity.embeddings,
        "raw_embeddings": identity.raw_embeddings,
        "keypoints": identity.keypoints[0],
    }
    torch.save(inputs, folder / "inputs.pt")
    return {"identity": identity, "one": one, **inputs}


# ---------------------------------------------------------------------------------------------
# Official side (runs in a subprocess)


class _Float16AsFloat32:
    """``torch.float16`` aliased to float32 while the official IP-Adapter classes (which hard-code it) run."""

    def __enter__(self) -> None:
        import torch

        self._saved = torch.float16
        torch.float16 = torch.float32

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.float16 = self._saved


def _official(adapter: str, mode: str, folder: Path) -> Any:
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    inputs = torch.load(folder / "inputs.pt", weights_only=False)
    guidance = MODES[mode]
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=guidance,
                  output_type="latent", height=SIZE, width=SIZE)
    ckpt = inputs["checkpoints"][adapter]

    def tiny_backbone(pipe):
        # FastFace's "tiny" backbone: the tiny SDXL + its distillation LoRA, Euler with trailing spacing.
        from diffusers import EulerDiscreteScheduler

        pipe.load_lora_weights(inputs["distill_lora"], adapter_name="distill")
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    if adapter == "instantid":
        from diffusers import ControlNetModel
        from pipeline_stable_diffusion_xl_instantid import StableDiffusionXLInstantIDPipeline, draw_kps

        controlnet = ControlNetModel.from_pretrained(inputs["controlnet"])
        pipe = tiny_backbone(StableDiffusionXLInstantIDPipeline.from_pretrained(inputs["backbone"],
                                                                                controlnet=controlnet))
        pipe.load_ip_adapter_instantid(ckpt, image_emb_dim=inputs["raw_embeddings"].shape[1])
        kps_image = draw_kps(Image.fromarray(inputs["photo"]), inputs["keypoints"])
        out = pipe(image_embeds=inputs["raw_embeddings"][0], image=kps_image,
                   controlnet_conditioning_scale=CONTROLNET_SCALE, ip_adapter_scale=IP_SCALE,
                   generator=torch.Generator().manual_seed(SEED), **common)
        return {"latents": out.images, "kps": np.asarray(kps_image)}
    pipe = tiny_backbone(StableDiffusionXLPipeline.from_pretrained(inputs["backbone"]))
    if adapter == "plus-face":
        from transformers import CLIPImageProcessor

        with _Float16AsFloat32():
            from ip_adapter.ip_adapter import IPAdapterPlusXL

            model = IPAdapterPlusXL(pipe, inputs["image_encoder"], ckpt, "cpu", num_tokens=16)
            # The tiny encoder's own preprocessing (32 px) instead of ViT-H's 224 px default.
            model.clip_image_processor = CLIPImageProcessor.from_pretrained(inputs["image_encoder"])
            latents = model.generate(pil_image=Image.fromarray(inputs["crop"]), scale=IP_SCALE, num_samples=1,
                                     seed=SEED, **common)
        return {"latents": latents}
    from ip_adapter.ip_adapter_faceid_separate import IPAdapterFaceIDXL

    embeds = inputs["embeddings"] if adapter == "faceid-portrait" else inputs["raw_embeddings"]
    embeds = torch.from_numpy(np.asarray(embeds))[None]  # (1, n photos, D)
    count, dim = embeds.shape[1], embeds.shape[2]
    if adapter == "faceid-portrait":

        class Portrait(IPAdapterFaceIDXL):
            def init_proj(self):  # the official MLPProjModel, for the checkpoint's embedding size
                from ip_adapter.ip_adapter_faceid_separate import MLPProjModel

                return MLPProjModel(self.pipe.unet.config.cross_attention_dim, dim, self.num_tokens).to(
                    self.device, dtype=self.torch_dtype)

        model = Portrait(pipe, ckpt, "cpu", num_tokens=16, n_cond=count, torch_dtype=torch.float32)
        latents = model.generate(faceid_embeds=embeds, scale=IP_SCALE, num_samples=1, seed=SEED, **common)
        return {"latents": latents}

    from ip_adapter.resampler import Resampler

    class PortraitUnnorm(IPAdapterFaceIDXL):
        def init_proj(self):  # the official Resampler, as in InstantID / ComfyUI for _unnorm
            return Resampler(dim=OFFICIAL_RESAMPLER_DIM, depth=4, dim_head=64, heads=20, num_queries=self.num_tokens,
                             embedding_dim=dim, output_dim=self.pipe.unet.config.cross_attention_dim,
                             ff_mult=4).to(self.device, dtype=self.torch_dtype)

        def get_image_embeds(self, faceid_embeds):  # one Resampler input token per photo
            b, n, c = faceid_embeds.shape
            flat = faceid_embeds.reshape(b * n, 1, c)
            cond = self.image_proj_model(flat).reshape(b, -1, self.pipe.unet.config.cross_attention_dim)
            null = self.image_proj_model(torch.zeros_like(flat)).reshape(b, -1, cond.shape[-1])
            return cond, null

    model = PortraitUnnorm(pipe, ckpt, "cpu", num_tokens=16, n_cond=count, torch_dtype=torch.float32)
    latents = model.generate(faceid_embeds=embeds, scale=IP_SCALE, num_samples=1, seed=SEED, **common)
    return {"latents": latents}


def run_official(adapter: str, mode: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The official result, computed in a fresh interpreter with only that repository on the path."""
    import torch

    src = args.instantid_src if adapter == "instantid" else args.ip_adapter_src
    out = folder / f"official-{adapter}-{mode}.pt"
    env = dict(os.environ)
    paths = [str(Path(src).resolve()), *(str(Path(p).resolve()) for p in args.extra_path)]
    env["FASTFACE_CONFORMANCE_PATH"] = os.pathsep.join(paths)
    cmd = [sys.executable, __file__, "--official-run", adapter, mode, str(folder), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"official {adapter} ({mode}) failed:\n{proc.stderr[-3000:]}")
    return torch.load(out, weights_only=False)


def _official_entry(adapter: str, mode: str, folder: str, out: str) -> None:
    import torch

    for path in reversed(os.environ["FASTFACE_CONFORMANCE_PATH"].split(os.pathsep)):
        sys.path.insert(0, path)
    # Both repositories import MultiControlNetModel from where older diffusers kept it; this
    # subprocess (only) points those names at its current home.
    import diffusers.models.controlnets.multicontrolnet as moved
    import diffusers.pipelines.controlnet as old_home

    sys.modules.setdefault("diffusers.pipelines.controlnet.multicontrolnet", moved)
    if not hasattr(old_home, "MultiControlNetModel"):
        old_home.MultiControlNetModel = moved.MultiControlNetModel
    with torch.no_grad():
        result = _official(adapter, mode, Path(folder))
    torch.save(result, out)


# ---------------------------------------------------------------------------------------------
# FastFace side


def run_fastface(adapter: str, mode: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """FastFace's final latents for the same inputs: method none, and for CFG 5 the constant
    α = β = 5 without rescale (= stock CFG), with the same negative prompt."""
    import torch

    from fastface.guidance import GuidanceConfig
    from fastface.pipeline import FastFacePipeline

    pipe = FastFacePipeline.from_pretrained("tiny", adapter, adapter_path=inputs["checkpoints"][adapter], device="cpu",
                                            dtype=torch.float32)
    identity = inputs["identity"] if adapter.startswith("faceid-portrait") else inputs["one"]
    guidance = GuidanceConfig(alpha=MODES[mode], beta=MODES[mode], rescale=0.0)
    options = {"controlnet_scale": CONTROLNET_SCALE} if adapter == "instantid" else None
    result = pipe(PROMPT, identity, method="none", guidance=guidance, negative_prompt=NEGATIVE, ip_scale=IP_SCALE,
                  steps=STEPS, height=SIZE, width=SIZE, seed=SEED, output_type="latent", progress=False,
                  adapter_options=options)
    out = {"latents": result.latents}
    if adapter == "instantid":
        conditioning = pipe.encode_identity(identity)
        out["kps"] = conditioning.extras["keypoint_image"]
    return out


def relative(a: Any, b: Any) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ip-adapter-src", help="checkout of tencent-ailab/IP-Adapter")
    parser.add_argument("--instantid-src", help="checkout of instantX-research/InstantID")
    parser.add_argument("--extra-path", action="append", default=[], help="more sys.path entries (e.g. einops)")
    parser.add_argument("--adapters", default=",".join(ADAPTERS))
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--official-run", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.official_run:
        _official_entry(*args.official_run)
        return 0
    if not args.ip_adapter_src or not args.instantid_src:
        parser.error("--ip-adapter-src and --instantid-src are required")
    adapters = [a.strip() for a in args.adapters.split(",") if a.strip()]
    results = []
    with tempfile.TemporaryDirectory(prefix="ff-conformance-") as tmp:
        folder = Path(tmp)
        inputs = write_inputs(folder)
        for adapter in adapters:
            for mode in MODES:
                official = run_official(adapter, mode, folder, args)
                ours = run_fastface(adapter, mode, inputs)
                diff = relative(ours["latents"], official["latents"])
                row = {"adapter": adapter, "mode": mode, "max_relative_difference": diff,
                       "ok": diff <= args.tolerance}
                if "kps" in official and "kps" in ours:
                    row["keypoint_image_equal"] = bool((official["kps"] == ours["kps"]).all())
                results.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
