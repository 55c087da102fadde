"""Per-image metrics of the evaluation protocol.

Each *scorer* loads its model once (:meth:`Scorer.load`, which raises :class:`Unavailable` with a
reason when the model cannot be had) and then maps one sample to a dict of values. A value of
``None`` is a failure (no face found, reference image missing) and is counted as such; a key that
is absent means "does not apply" (the style part of a realistic prompt).

Scorers and the values they produce (``<enc>`` a face backend, ``<clip>`` a CLIP label):

- ``identity-<enc>``: ``id.<enc>`` cosine to the conditioning photos' mean embedding,
  ``id_heldout.<enc>`` cosine to the held-out photos' mean, ``copy_paste.<enc>`` their difference,
  ``face_detected.<enc>`` 1/0.
- ``clip-<clip>``: ``clip_t.<clip>`` image-text cosine on the full prompt; stylistic samples also
  ``clip_style.<clip>``: the style part against the face crop.
- ``aesthetic``: ``aesthetic`` LAION improved aesthetic predictor (linear MLP on the normalised
  CLIP ViT-L/14 image embedding).
- ``image-reward``: ``image_reward`` through the official ``image-reward`` package.
- ``disruption-<clip>``: ``clip_i.<clip>`` image-image CLIP cosine to the same sample of a run
  without identity.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, FastFaceError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_CLIP_MODELS = ("openai/clip-vit-large-patch14", "openai/clip-vit-base-patch32")
DEFAULT_AESTHETIC_HEAD = "camenduru/improved-aesthetic-predictor"
AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
DEFAULT_IMAGE_REWARD = "ImageReward-v1.0"
FACE_CROP_MARGIN = 0.6  # fraction of the face box added on every side for the style crop


class Unavailable(Exception):
    """A metric whose model cannot be had here; the message is the reason shown in reports."""


@dataclass
class SampleContext:
    """One generated image with what scorers share: the record, the image, lazily a face box."""

    sample: str
    record: dict
    image: np.ndarray  # RGB uint8
    identity_photos: tuple[tuple[Path, ...], tuple[Path, ...]]  # (conditioning, held out)
    reference_image: np.ndarray | None = None
    crop_detector: Any = None
    _face_box: Any = field(default=None, repr=False)
    _face_box_done: bool = field(default=False, repr=False)

    def face_crop(self) -> np.ndarray | None:
        """A square crop around the largest face (margin added), or None when none is found."""
        if not self._face_box_done:
            self._face_box_done = True
            if self.crop_detector is not None:
                from ..faces import detect_faces

                found = detect_faces(self.image, self.crop_detector)
                if found:
                    self._face_box = max(found, key=lambda f: f.area).bbox
        if self._face_box is None:
            return None
        return square_crop(self.image, self._face_box, FACE_CROP_MARGIN)


def square_crop(image: np.ndarray, bbox: Any, margin: float) -> np.ndarray:
    """The square around ``bbox`` grown by ``margin`` of its size per side, clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in bbox)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = max(x1 - x0, y1 - y0) * (0.5 + margin)
    h, w = image.shape[:2]
    left, top = max(0, int(round(cx - half))), max(0, int(round(cy - half)))
    right, bottom = min(w, int(round(cx + half))), min(h, int(round(cy + half)))
    return image[top:bottom, left:right]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """cos(a, b) = a·b / (|a| |b|)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def slug(name: str) -> str:
    """A short label for a model name: ``openai/clip-vit-large-patch14`` -> ``vit-l-14``."""
    base = Path(str(name).rstrip("/")).name.lower()
    m = re.search(r"vit-(base|large|huge|b|l|h|g|bigg)-?(?:patch)?(\d+)", base)
    if m:
        size = {"base": "b", "large": "l", "huge": "h"}.get(m.group(1), m.group(1))
        return f"vit-{size}-{m.group(2)}"
    return re.sub(r"[^a-z0-9]+", "-", base).strip("-") or "model"


class Scorer:
    """Base of all scorers: ``name`` names the cache files, ``spec`` what a cached value depends on."""

    name: str = "scorer"
    description: str = ""

    def spec(self) -> dict:
        return {}

    def load(self) -> None:
        """Load the model(s); raise :class:`Unavailable` with the reason when that is impossible."""

    def metric_keys(self) -> list[str]:
        return []

    def score(self, ctx: SampleContext) -> dict[str, float | None]:
        raise TypeError(f"{type(self).__name__} does not score")


# --- identity ----------------------------------------------------------------------------------

class IdentityScorer(Scorer):
    """Face-embedding cosine similarity under one face encoder, with detection failures kept."""

    def __init__(self, backend: str) -> None:
        self.backend_name = backend
        self.name = f"identity-{backend}"
        self.description = f"identity similarity ({backend} face embeddings)"
        self._backend: Any = None
        self._refs: dict[tuple[str, ...], np.ndarray | None] = {}

    def spec(self) -> dict:
        # Known before loading: the key decides whether loading is needed at all.
        return {"backend": self.backend_name}

    def load(self) -> None:
        from .. import faces

        if self.backend_name not in faces.BACKENDS:
            raise ConfigError(f"unknown face backend '{self.backend_name}'; choose from {', '.join(faces.BACKENDS)}")
        try:
            self._backend = faces.get_backend(self.backend_name)
        except FastFaceError as exc:
            raise Unavailable(f"face backend '{self.backend_name}': {exc}") from exc

    def metric_keys(self) -> list[str]:
        b = self.backend_name
        return [f"id.{b}", f"id_heldout.{b}", f"copy_paste.{b}", f"face_detected.{b}"]

    def _reference(self, photos: tuple[Path, ...]) -> np.ndarray | None:
        """Normalised mean embedding of photos (cached per set of photos); None without photos."""
        from .. import faces

        key = tuple(str(p) for p in photos)
        if key not in self._refs:
            self._refs[key] = None
            if photos:
                self._refs[key] = faces.build_identity(list(key), backend=self._backend, progress=False).embedding
        return self._refs[key]

    def score(self, ctx: SampleContext) -> dict[str, float | None]:
        from .. import faces
        from ..errors import NoFaceError

        b = self.backend_name
        conditioning, held_out = ctx.identity_photos
        reference = self._reference(conditioning)
        held = self._reference(held_out)
        try:
            face = faces.analyze(ctx.image, self._backend)
        except NoFaceError:
            face = None
        values: dict[str, float | None] = {f"face_detected.{b}": 0.0 if face is None else 1.0}
        sim = None if face is None else cosine(face.embedding, reference)
        values[f"id.{b}"] = sim
        if held is not None:  # no held-out photo: the copy-paste index does not apply
            sim_held = None if face is None else cosine(face.embedding, held)
            values[f"id_heldout.{b}"] = sim_held
            values[f"copy_paste.{b}"] = None if sim is None else sim - sim_held
        return values


# --- CLIP ----------------------------------------------------------------------------------------

class ClipModel:
    """A transformers CLIPModel with its tokenizer and a NumPy/PIL re-implementation of the CLIP
    image preprocessing read from ``preprocessor_config.json`` (transformers' image processors want
    torchvision, which is not required here)."""

    def __init__(self, name: str, device: str | None = None) -> None:
        self.name = name
        self.device = device
        self.model: Any = None

    def load(self) -> None:
        from ..hub import resolve_folder

        try:
            folder = resolve_folder(self.name, what=f"CLIP model '{self.name}'",
                                    allow_patterns=["*.json", "*.txt", "*.safetensors"],
                                    hint="download it on a connected machine and pass its folder with --clip-model")
        except FastFaceError as exc:
            raise Unavailable(str(exc)) from exc
        import torch
        from transformers import CLIPModel, CLIPTokenizer

        try:
            self.model = CLIPModel.from_pretrained(folder).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise Unavailable(f"CLIP model '{self.name}' could not be loaded from {folder}: {exc}") from exc
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        pre = {}
        if (folder / "preprocessor_config.json").is_file():
            pre = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
        size = pre.get("size", 224)
        crop = pre.get("crop_size", size)
        self.resize = int(size.get("shortest_edge", 224) if isinstance(size, dict) else size)
        self.crop = int(crop.get("height", self.resize) if isinstance(crop, dict) else crop)
        self.mean = np.asarray(pre.get("image_mean", CLIP_MEAN), dtype=np.float32)
        self.std = np.asarray(pre.get("image_std", CLIP_STD), dtype=np.float32)

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    def pixels(self, images: list[np.ndarray]):
        """Resize the shorter side (bicubic), centre-crop, scale to [0,1], normalise: (n,3,c,c)."""
        import torch
        from PIL import Image

        out = []
        for array in images:
            img = Image.fromarray(array)
            w, h = img.size
            scale = self.resize / min(w, h)
            img = img.resize((max(self.crop, round(w * scale)), max(self.crop, round(h * scale))), Image.BICUBIC)
            w, h = img.size
            left, top = (w - self.crop) // 2, (h - self.crop) // 2
            img = img.crop((left, top, left + self.crop, top + self.crop))
            x = (np.asarray(img, dtype=np.float32) / 255.0 - self.mean) / self.std
            out.append(x.transpose(2, 0, 1))
        return torch.from_numpy(np.stack(out)).to(self.device)

    def image_embeds(self, images: list[np.ndarray]) -> np.ndarray:
        """L2-normalised projected image embeddings (n, dim)."""
        import torch

        with torch.inference_mode():
            feats = self.model.get_image_features(pixel_values=self.pixels(images))
        feats = getattr(feats, "pooler_output", feats)
        feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy()

    def text_embeds(self, texts: list[str]) -> np.ndarray:
        """L2-normalised projected text embeddings (n, dim); texts past the context are truncated."""
        import torch

        tokens = self.tokenizer(texts, padding=True, truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
        with torch.inference_mode():
            feats = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                 attention_mask=tokens["attention_mask"].to(self.device))
        feats = getattr(feats, "pooler_output", feats)
        feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy()


class ClipTextScorer(Scorer):
    """CLIP-T on the full prompt; for stylistic prompts also the style part on the face crop."""

    def __init__(self, clip: ClipModel, crop_backend: str | None) -> None:
        self.clip = clip
        self.label = slug(clip.name)
        self.name = f"clip-{self.label}"
        self.crop_backend = crop_backend
        self.description = f"CLIP-T ({clip.name}); style part on the face crop ({crop_backend} detector)"

    def spec(self) -> dict:
        return {"model": self.clip.name, "crop_backend": self.crop_backend, "crop_margin": FACE_CROP_MARGIN}

    def load(self) -> None:
        if self.clip.model is None:
            self.clip.load()

    def metric_keys(self) -> list[str]:
        return [f"clip_t.{self.label}", f"clip_style.{self.label}"]

    def score(self, ctx: SampleContext) -> dict[str, float | None]:
        image = self.clip.image_embeds([ctx.image])[0]
        text = self.clip.text_embeds([ctx.record["prompt"]])[0]
        values: dict[str, float | None] = {f"clip_t.{self.label}": float(image @ text)}
        style = ctx.record.get("style")
        if style:
            crop = ctx.face_crop()
            if crop is None or min(crop.shape[:2]) < 2:
                values[f"clip_style.{self.label}"] = None
            else:
                face = self.clip.image_embeds([crop])[0]
                values[f"clip_style.{self.label}"] = float(face @ self.clip.text_embeds([style])[0])
        return values


class DisruptionScorer(Scorer):
    """CLIP-I between the image and the same sample (same seed) generated without identity."""

    def __init__(self, clip: ClipModel, reference_run: Path | None) -> None:
        self.clip = clip
        self.label = slug(clip.name)
        self.name = f"disruption-{self.label}"
        self.reference_run = reference_run
        self.description = f"CLIP-I to the no-identity run ({clip.name})"

    def spec(self) -> dict:
        return {"model": self.clip.name, "reference_run": str(self.reference_run)}

    def load(self) -> None:
        if self.reference_run is None:
            raise Unavailable("no reference run: generate one with `fastface eval run --no-identity` (same "
                              "dataset, backbone, steps and size) and pass it with --reference-run")
        if self.clip.model is None:
            self.clip.load()

    def metric_keys(self) -> list[str]:
        return [f"clip_i.{self.label}"]

    def score(self, ctx: SampleContext) -> dict[str, float | None]:
        key = f"clip_i.{self.label}"
        if ctx.reference_image is None:
            return {key: None}
        a, b = self.clip.image_embeds([ctx.image, ctx.reference_image])
        return {key: float(a @ b)}


# --- quality ---------------------------------------------------------------------------------------

def linear_stack_from_state(state: dict[str, Any]):
    """The LAION aesthetic head: Linear layers applied in order, no activation (dropout is a no-op
    at inference). Layer sizes come from the weights, so any input width loads."""
    import torch

    prefix_re = re.compile(r"^(?:.*\.)?layers\.(\d+)\.weight$")
    indices = sorted((int(m.group(1)), k[: -len(".weight")]) for k in state for m in [prefix_re.match(k)] if m)
    if not indices:
        raise Unavailable("the aesthetic head has no 'layers.N.weight' tensors")
    linears = []
    for _, base in indices:
        w = state[base + ".weight"]
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=base + ".bias" in state)
        with torch.no_grad():
            layer.weight.copy_(w)
            if layer.bias is not None:
                layer.bias.copy_(state[base + ".bias"])
        linears.append(layer)
    return torch.nn.Sequential(*linears).eval()


class AestheticScorer(Scorer):
    """LAION improved aesthetic predictor: MLP head on the L2-normalised CLIP ViT-L/14 image embedding."""

    name = "aesthetic"

    def __init__(self, clip: ClipModel, head: str) -> None:
        self.clip = clip
        self.head_name = head
        self.description = f"LAION aesthetic ({head} on {clip.name})"
        self.head: Any = None

    def spec(self) -> dict:
        return {"clip": self.clip.name, "head": self.head_name}

    def load(self) -> None:
        from ..hub import resolve_file

        path = Path(self.head_name).expanduser()
        filename = None if path.is_file() else AESTHETIC_HEAD_FILE
        if path.is_dir() and not (path / AESTHETIC_HEAD_FILE).is_file():
            found = sorted([*path.glob("*.safetensors"), *path.glob("*.pth")])
            filename = found[0].name if found else AESTHETIC_HEAD_FILE
        try:
            weights = resolve_file(self.head_name, filename, what="LAION aesthetic head",
                                   hint="download the .pth on a connected machine and pass it with --aesthetic-head")
        except FastFaceError as exc:
            raise Unavailable(str(exc)) from exc
        if self.clip.model is None:
            self.clip.load()
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            import torch

            state = torch.load(weights, map_location="cpu", weights_only=True)
        self.head = linear_stack_from_state(state)
        width = self.head[0].in_features
        if width != self.clip.dim:
            raise Unavailable(f"aesthetic head {weights.name} takes {width}-d embeddings but {self.clip.name} "
                              f"gives {self.clip.dim}-d (it needs CLIP ViT-L/14)")

    def metric_keys(self) -> list[str]:
        return ["aesthetic"]

    def score(self, ctx: SampleContext) -> dict[str, float | None]:
        import torch

        emb = torch.from_numpy(self.clip.image_embeds([ctx.image]))
        with torch.inference_mode():
            return {"aesthetic": float(self.head(emb.float())[0, 0])}


class ImageRewardScorer(Scorer):
    """ImageReward through its official package (BLIP + reward head, the published checkpoint)."""

    name = "image-reward"

    def __init__(self, model: str, device: str | None = None) -> None:
        self.model_name = model
        self.device = device
        self.description = f"ImageReward ({model})"
        self.model: Any = None

    def spec(self) -> dict:
        return {"model": self.model_name}

    def load(self) -> None:
        try:
            import ImageReward as reward  # the official package: pip install image-reward
        except Exception as exc:  # its import pulls torchvision/timm; any failure means "not here"
            raise Unavailable(
                "ImageReward needs the official 'image-reward' package and its BLIP dependencies "
                f"(torchvision, timm), which are not importable here ({type(exc).__name__}: {exc})") from exc
        try:
            kwargs = {} if self.device is None else {"device": self.device}
            self.model = reward.load(self.model_name, **kwargs)
        except Exception as exc:  # offline download failure, wrong path: report, never score 0
            raise Unavailable(f"ImageReward model '{self.model_name}' could not be loaded: {exc}") from exc

    def metric_keys(self) -> list[str]:
        return ["image_reward"]

    def score(self, ctx: SampleContext) -> dict[str, float | None]:
        from PIL import Image

        return {"image_reward": float(self.model.score(ctx.record["prompt"], Image.fromarray(ctx.image)))}


COST_KEYS = ("wall_ms", "unet_evaluations", "peak_memory_mb")


def cost_values(record: dict) -> dict[str, float | None]:
    """Cost of one sample from its record (model loading excluded by construction)."""
    out: dict[str, float | None] = {}
    for key in COST_KEYS:
        value = record.get(key)
        out[key] = None if value is None else float(value)
    return out
