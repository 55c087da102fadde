"""FastFace's PuLID against the official PuLID code, on the same tiny random checkpoints.

Not a test (the suite must not need PuLID's code): a script that reproduces the numbers in
docs/PULID.md. It needs checkouts of ``ToTheBeginning/PuLID`` and ``xinntao/facexlib`` and the
pure-Python ``einops`` on ``sys.path`` (e.g. ``pip install --target /tmp/pkgs einops``)::

    python benchmarks/pulid_conformance.py --pulid /tmp/PuLID --facexlib /tmp/facexlib \\
        --extra-path /tmp/pkgs --work /tmp/pulid_conformance

The official modules are imported from their files and their classes run unchanged, except for
what cannot load beside FastFace's torch: ``timm``'s init helpers (used only to initialise), a
``torchvision`` class name imported but unused by the vision tower, and in the pipelines the face
detectors (the given keypoints' aligned face and raw embedding stand in for facexlib's RetinaFace
and insightface's antelopev2) and torchvision 0.15's tensor ``resize`` / ``normalize`` (bicubic
without antialiasing, the normalisation formula). PuLID's pipeline classes are taken from their
files by AST, without their module-level imports.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
PORTRAIT = REPO / "src" / "fastface" / "data" / "portrait.jpg"


# ---------------------------------------------------------------------------------------------
# Importing the official modules beside our torch


def _stand_in_modules() -> dict[str, types.ModuleType]:
    """``timm.models.layers`` (init helpers) and ``torchvision.ops.misc`` (a class name) stand-ins."""
    layers = types.ModuleType("timm.models.layers")
    layers.drop_path = lambda x, drop_prob=0.0, training=False: x  # drop path rate is 0 at inference
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.trunc_normal_ = lambda t, mean=0.0, std=1.0, a=-2.0, b=2.0: nn.init.trunc_normal_(t, mean, std, a, b)
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (), {})
    mods = {"timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models"),
            "timm.models.layers": layers, "torchvision": types.ModuleType("torchvision"),
            "torchvision.ops": types.ModuleType("torchvision.ops"), "torchvision.ops.misc": misc}
    return mods


def import_official(pulid: Path, facexlib: Path) -> types.SimpleNamespace:
    sys.path[:0] = [str(pulid), str(facexlib)]
    # Their package __init__ files import torchvision & co: bare packages, leaf modules only.
    for name, path in (("eva_clip", pulid / "eva_clip"), ("facexlib", facexlib / "facexlib"),
                       ("facexlib.parsing", facexlib / "facexlib" / "parsing")):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
    os.environ["RoPE"] = "1"  # what eva_clip's factory sets for EVA02 models
    stand_ins = _stand_in_modules()
    sys.modules.update(stand_ins)
    try:
        out = types.SimpleNamespace(
            eva=importlib.import_module("eva_clip.eva_vit_model"),
            transformer=importlib.import_module("eva_clip.transformer"),
            constants=importlib.import_module("eva_clip.constants"),
        )
    finally:
        for name in stand_ins:  # transformers must not believe torchvision is installed
            del sys.modules[name]
    out.bisenet = importlib.import_module("facexlib.parsing.bisenet")
    out.encoders = importlib.import_module("pulid.encoders")
    out.encoders_transformer = importlib.import_module("pulid.encoders_transformer")
    out.attention = importlib.import_module("pulid.attention_processor")
    out.root = pulid
    return out


class RemapNN:
    """``torch.nn`` with PuLID's hard-coded widths (1024: EVA width, 1280: condition) remapped to tiny ones."""

    def __init__(self, remap: dict[int, int]) -> None:
        self.remap = remap

    def __getattr__(self, name: str):
        return getattr(nn, name)

    def Linear(self, d_in: int, d_out: int, bias: bool = True) -> nn.Linear:
        return nn.Linear(self.remap.get(d_in, d_in), self.remap.get(d_out, d_out), bias=bias)

    def LayerNorm(self, dim: int, *args, **kwargs) -> nn.LayerNorm:
        return nn.LayerNorm(self.remap.get(dim, dim), *args, **kwargs)


def official_eva(off: types.SimpleNamespace, cfg: dict) -> nn.Module:
    """The EVA02-CLIP-L-14-336 vision tower class with its config's flags, at the tiny sizes."""
    return off.eva.EVAVisionTransformer(
        img_size=cfg["image"], patch_size=cfg["patch"], num_classes=cfg["embed"], use_mean_pooling=False,
        init_values=None, patch_dropout=0.0, embed_dim=cfg["width"], depth=cfg["depth"],
        num_heads=cfg["width"] // cfg["head_dim"], mlp_ratio=2.6667, qkv_bias=True, drop_path_rate=0.0,
        norm_layer=partial(off.transformer.LayerNorm, eps=1e-6), xattn=True, rope=True, postnorm=False,
        pt_hw_seq_len=16, intp_freq=True, naiveswiglu=True, subln=True).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ---------------------------------------------------------------------------------------------
# Networks


def compare_networks(off: types.SimpleNamespace, tiny: Path, parsing_sd: dict) -> dict[str, float]:
    from safetensors.torch import load_file

    from fastface.models.eva_clip import EVAVisionTower
    from fastface.models.face_parsing import BiSeNet
    from fastface.models.pulid_encoders import IDEncoder, IDFormer
    from fastface.testing import EVA_CLIP_FILE, PULID_V1_FILE, PULID_V11_FILE, TINY_ANTELOPE_DIM, TINY_EVA

    out: dict[str, float] = {}
    g = torch.Generator().manual_seed(0)
    sd = torch.load(tiny / EVA_CLIP_FILE, weights_only=True)
    eva0 = official_eva(off, TINY_EVA)
    eva0.load_state_dict({k[7:]: v for k, v in sd.items() if k.startswith("visual.") and "freqs" not in k},
                         strict=False)
    eva1 = EVAVisionTower.from_state_dict(sd)
    pixels = torch.randn(3, 3, TINY_EVA["image"], TINY_EVA["image"], generator=g)
    with torch.no_grad():
        c0, h0 = eva0(pixels, return_all_features=False, return_hidden=True, shuffle=False)
        c1, h1 = eva1(pixels)
    out["eva_class_embedding"] = _rel(c1, c0)
    out["eva_hidden_states"] = max(_rel(a, b) for a, b in zip(h1, h0))
    parse0 = off.bisenet.BiSeNet(num_class=19)
    parse0.load_state_dict(parsing_sd)
    parse0.eval()
    image = torch.randn(1, 3, 128, 128, generator=g)
    with torch.no_grad():
        out["bisenet_logits"] = _rel(BiSeNet.from_state_dict(parsing_sd)(image), parse0(image)[0])
    remap = {1024: TINY_EVA["width"], 1280: TINY_ANTELOPE_DIM + TINY_EVA["embed"]}
    off.encoders.nn = RemapNN(remap)
    off.encoders_transformer.nn = RemapNN(remap)
    v1, v11 = torch.load(tiny / PULID_V1_FILE, weights_only=True), load_file(str(tiny / PULID_V11_FILE))
    strip = {"v1": {k[11:]: v for k, v in v1.items() if k.startswith("id_adapter.")},
             "v11": {k[11:]: v for k, v in v11.items() if k.startswith("id_adapter.")}}
    enc0 = off.encoders.IDEncoder(width=remap[1280], context_dim=64)
    enc0.load_state_dict(strip["v1"], strict=True)
    former0 = off.encoders_transformer.IDFormer(dim=64, depth=10, dim_head=64, heads=2, num_id_token=5,
                                                num_queries=32, output_dim=64)
    former0.load_state_dict(strip["v11"], strict=True)
    enc1, former1 = IDEncoder.from_state_dict(v1), IDFormer.from_state_dict(v11)
    cond = torch.randn(1, remap[1280], generator=g)
    hidden = [t[:1] for t in h0]
    zeros = [torch.zeros_like(t) for t in hidden]
    with torch.no_grad():
        out["id_encoder_v1"] = _rel(enc1.eval()(cond, hidden), enc0.eval()(cond, hidden))
        out["id_encoder_v1_null"] = _rel(enc1(torch.zeros_like(cond), zeros), enc0(torch.zeros_like(cond), zeros))
        out["id_former_v11"] = _rel(former1.eval()(cond, hidden), former0.eval()(cond, hidden))
        out["id_former_v11_null"] = _rel(former1(torch.zeros_like(cond), zeros), former0(torch.zeros_like(cond), zeros))
    return out


# ---------------------------------------------------------------------------------------------
# Pipelines


def _extract(path: Path, names: tuple[str, ...], namespace: dict) -> dict:
    """Run only the named top-level functions/classes of an official file (not its imports)."""
    tree = ast.parse(path.read_text())
    nodes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def _karras_table(path: Path, obj: object) -> None:
    """v1.1's ``__init__`` lines from ``linear_start`` to ``self.sigma_data``, run on ``obj``."""
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PuLIDPipeline")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    body = init.body
    start = next(i for i, n in enumerate(body) if "linear_start" in ast.unparse(n))
    end = next(i for i, n in enumerate(body) if "sigma_data" in ast.unparse(n))
    exec(compile(ast.Module(body=body[start:end + 1], type_ignores=[]), str(path), "exec"),
         {"torch": torch, "np": np, "self": obj})


def _tv_resize(img: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """torchvision 0.15 ``F.resize`` on a float tensor with ``antialias=None`` (no antialiasing)."""
    h, w = img.shape[-2:]
    oh, ow = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    return F.interpolate(img, size=[oh, ow], mode=interpolation, align_corners=False, antialias=False)


def _tv_normalize(t: torch.Tensor, mean, std) -> torch.Tensor:
    return (t - torch.as_tensor(mean, dtype=t.dtype).view(-1, 1, 1)) / torch.as_tensor(std, dtype=t.dtype).view(-1, 1, 1)


def run_official(off, version: str, backbone: Path, pulid_file: Path, eva_sd: dict, parsing_sd: dict,
                 face_rgb: np.ndarray, raw: np.ndarray, work: Path, *, prompt: str, prompt_n: str, size: int,
                 steps: int, cfg: float, id_scale: float, num_zero: int, ortho: str, seed: int) -> torch.Tensor:
    """Final latents (before the VAE) of the official ``PuLIDPipeline.inference``."""
    import cv2
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline
    from safetensors.torch import load_file
    from tqdm.auto import trange

    from fastface.testing import TINY_EVA

    utils = _extract(off.root / "pulid" / "utils.py", ("img2tensor", "sample_dpmpp_2m"),
                     {"cv2": cv2, "torch": torch, "np": np, "trange": trange})
    remap = {1024: TINY_EVA["width"], 1280: len(raw) + TINY_EVA["embed"]}
    off.encoders.nn = RemapNN(remap)
    off.encoders_transformer.nn = RemapNN(remap)
    namespace = {
        "gc": __import__("gc"), "cv2": cv2, "torch": torch, "nn": nn, "np": np, "load_file": load_file,
        "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
        "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
        "AttnProcessor": off.attention.AttnProcessor2_0, "IDAttnProcessor": off.attention.IDAttnProcessor2_0,
        "IDEncoder": off.encoders.IDEncoder, "IDFormer": off.encoders_transformer.IDFormer,
        "img2tensor": utils["img2tensor"], "tensor2img": lambda *a, **k: None, "normalize": _tv_normalize,
        "resize": _tv_resize, "InterpolationMode": types.SimpleNamespace(BICUBIC="bicubic"),
        "sample_dpmpp_2m": utils["sample_dpmpp_2m"], "hf_hub_download": lambda *a, **k: None,
    }
    source = off.root / "pulid" / ("pipeline.py" if version == "v1" else "pipeline_v1_1.py")
    cls = _extract(source, ("PuLIDPipeline",), namespace)["PuLIDPipeline"]
    obj = cls.__new__(cls)  # __init__ downloads models: its steps are replayed below
    obj.device = "cpu"
    pipe = StableDiffusionXLPipeline.from_pretrained(str(backbone), torch_dtype=torch.float32)
    pipe.watermark = None
    obj.pipe = pipe
    obj.hack_unet_attn_layers(pipe.unet)
    captured: list[torch.Tensor] = []
    if version == "v1":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
        obj.id_adapter = off.encoders.IDEncoder(width=remap[1280], context_dim=64)
    else:
        obj.id_adapter = off.encoders_transformer.IDFormer(dim=64, depth=10, dim_head=64, heads=2, num_id_token=5,
                                                           num_queries=32, output_dim=64)
        _karras_table(source, obj)

        def sampler(*args, **kwargs):
            captured.append(utils["sample_dpmpp_2m"](*args, **kwargs))
            return captured[-1]

        obj.sampler = sampler
    parse = off.bisenet.BiSeNet(num_class=19)
    parse.load_state_dict(parsing_sd)
    parse.eval()
    obj.face_helper = types.SimpleNamespace(
        clean_all=lambda: None, read_image=lambda img: None, get_face_landmarks_5=lambda **k: None,
        align_warp_face=lambda: None, cropped_faces=[cv2.cvtColor(face_rgb, cv2.COLOR_RGB2BGR)], face_parse=parse)
    eva = official_eva(off, TINY_EVA)
    eva.load_state_dict({k[7:]: v for k, v in eva_sd.items() if k.startswith("visual.") and "freqs" not in k},
                        strict=False)
    obj.clip_vision_model = eva
    obj.eva_transform_mean, obj.eva_transform_std = off.constants.OPENAI_DATASET_MEAN, off.constants.OPENAI_DATASET_STD
    side = face_rgb.shape[0]
    obj.app = types.SimpleNamespace(get=lambda img: [{"bbox": np.array([0, 0, side, side], np.float32),
                                                      "embedding": raw}])
    obj.handler_ante = None
    obj.debug_img_list = []
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    target = models / pulid_file.name
    if target.exists() or target.is_symlink():
        target.unlink()
    target.symlink_to(pulid_file.resolve())
    cwd = os.getcwd()
    os.chdir(work)  # load_pretrain reads models/<file>
    try:
        obj.load_pretrain()
    finally:
        os.chdir(cwd)
    attention = off.attention
    attention.NUM_ZERO, attention.ORTHO, attention.ORTHO_v2 = num_zero, ortho == "v1", ortho == "v2"
    with torch.no_grad():
        if version == "v1":
            embedding = obj.get_id_embedding(face_rgb)
            torch.manual_seed(seed)  # app.py: seed_everything(seed), then inference
            real = obj.pipe
            obj.pipe = lambda **kw: types.SimpleNamespace(images=real(**kw, output_type="latent").images)
            return obj.inference(prompt, (1, size, size), prompt_n, embedding, id_scale, cfg, steps)
        uncond, cond = obj.get_id_embedding([face_rgb])
        obj.inference(prompt, (1, size, size), prompt_n, cond, uncond, id_scale, cfg, steps, seed)
        return captured[-1]


def run_ours(version_adapter: str, scheduler: str, backbone: Path, folder: Path, identity, *, prompt: str,
             prompt_n: str, size: int, steps: int, cfg: float, id_scale: float, num_zero: int, ortho: str,
             seed: int) -> torch.Tensor:
    from fastface.pipeline import FastFacePipeline

    pipe = FastFacePipeline.from_pretrained("sdxl", version_adapter, base_model=str(backbone), adapter_path=str(folder),
                                            scheduler=scheduler, cfg_scale=cfg, device="cpu", dtype=torch.float32)
    cond = pipe.encode_identity(identity, num_zero=num_zero, ortho=ortho)
    result = pipe(prompt, cond, method="none", negative_prompt=prompt_n, steps=steps, height=size, width=size,
                  seed=seed, ip_scale=id_scale, output_type="latent", progress=False)
    return result.latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pulid", type=Path, required=True, help="checkout of ToTheBeginning/PuLID")
    parser.add_argument("--facexlib", type=Path, required=True, help="checkout of xinntao/facexlib")
    parser.add_argument("--extra-path", type=Path, default=None, help="folder holding einops")
    parser.add_argument("--work", type=Path, default=Path("pulid_conformance"))
    args = parser.parse_args()
    if args.extra_path:
        sys.path.insert(0, str(args.extra_path))
    torch.manual_seed(0)
    from PIL import Image

    from fastface.faces.types import Identity
    from fastface.models.pulid_face import FFHQ_TEMPLATE_512, align_face_512
    from fastface.testing import EVA_CLIP_FILE, PARSING_FILE, PULID_V1_FILE, PULID_V11_FILE, build_tiny_pulid
    from fastface.tiny import tiny_model_dir

    off = import_official(args.pulid, args.facexlib)
    work = args.work.resolve()
    tiny = work / "tiny"
    build_tiny_pulid(tiny)
    parse = off.bisenet.BiSeNet(num_class=19)  # facexlib's full-size net, random weights and statistics
    for module in parse.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.normal_(1, 0.1)
            module.bias.data.normal_(0, 0.1)
    (tiny / PARSING_FILE).unlink()
    torch.save(parse.state_dict(), tiny / PARSING_FILE)
    report: dict[str, float] = compare_networks(off, tiny, parse.state_dict())
    backbone = tiny_model_dir(work / "cache") / "backbone"
    photo = np.asarray(Image.open(PORTRAIT).convert("RGB"))
    keypoints = (FFHQ_TEMPLATE_512 * (min(photo.shape[:2]) / 700) + 20).astype(np.float32)
    raw = (np.random.default_rng(7).standard_normal(128) * 2.4).astype(np.float32)
    unit = raw / np.linalg.norm(raw)
    identity = Identity(embedding=unit, embeddings=unit[None], keypoints=[keypoints], sources=[str(PORTRAIT)],
                        backend="external", model="external")
    identity.raw_embeddings = raw[None]  # the face module's raw embedding (an Identity field where present)
    face = align_face_512(photo, keypoints)
    eva_sd = torch.load(tiny / EVA_CLIP_FILE, weights_only=True)
    runs = [
        ("v1 fidelity", "v1", "pulid", "dpm++2m-trailing", PULID_V1_FILE,
         dict(prompt_n="", steps=4, cfg=1.2, id_scale=0.8, num_zero=8, ortho="v2")),
        ("v1 extremely style", "v1", "pulid-style", "dpm++2m-trailing", PULID_V1_FILE,
         dict(prompt_n="ugly", steps=4, cfg=1.2, id_scale=0.8, num_zero=16, ortho="v1")),
        ("v1.1", "v1.1", "pulid-v1.1", "dpm++2m-karras-k", PULID_V11_FILE,
         dict(prompt_n="", steps=4, cfg=2.0, id_scale=0.8, num_zero=20, ortho="v2")),
        ("v1.1 no padding, no projection", "v1.1", "pulid-v1.1", "dpm++2m-karras-k", PULID_V11_FILE,
         dict(prompt_n="ugly", steps=3, cfg=2.0, id_scale=1.0, num_zero=0, ortho="off")),
    ]
    common = dict(prompt="a portrait photo", size=64, seed=1234)
    for name, version, adapter, scheduler, file, options in runs:
        official = run_official(off, version, backbone, tiny / file, eva_sd, parse.state_dict(), face, raw, work,
                                **common, **options)
        ours = run_ours(adapter, scheduler, backbone, tiny, identity, **common, **options)
        report[f"final latents, {name}"] = _rel(ours, official)
        print(f"{name}: max relative difference of the final latents {report[f'final latents, {name}']:.2e}")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
