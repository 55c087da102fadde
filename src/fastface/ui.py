"""``fastface ui``: a Gradio app on the same engine as the HTTP API.

Upload 1-4 photos (faces are boxed in a preview, one is chosen when there are several; the
identity is analysed once and reused while the prompt and settings change), pick a style, a
backbone, an adapter and a method, and generate; compare mode renders the same seeds with
several methods or backbones side by side. Every image can be downloaded as PNG with its JSON
metadata. Generation goes through :class:`fastface.serve.engine.Engine` and its one worker
thread, so the UI holds no second copy of the generation logic.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FastFaceError
from .serve.engine import Engine, GenerationRequest, RequestError, ServeLimits, Work, decode_photo, error_text
from .serve.styles import STYLES, apply_style

NOISE_BANNER = (
    "**Offline mode: tiny random-weight models.** The images are noise by construction: they show "
    "that every stage runs (face analysis, adapter, FastFace guidance), not what the method looks like. "
    "Download a real backbone (see `fastface doctor`) to see real pictures."
)
BOX_COLOURS = ((255, 64, 64), (64, 160, 255), (64, 200, 96), (255, 176, 32))


def _parse_schedule(text: str, name: str) -> float | tuple[float, ...] | None:
    text = (text or "").strip()
    if not text or text == "default":
        return None
    try:
        values = tuple(float(v) for v in text.replace(";", ",").split(",") if v.strip())
    except ValueError:
        raise RequestError(name, f"{name} must be a number or comma-separated numbers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _optional(value: Any) -> Any:
    return None if value in (None, "", 0) else value


class FastFaceUI:
    """The UI's callbacks over one engine (and its one worker thread)."""

    def __init__(self, engine: Engine, batcher: Any, *, default_backbone: str, out_dir: Path) -> None:
        self.engine = engine
        self.batcher = batcher
        self.default_backbone = default_backbone
        self.out_dir = out_dir

    # -- photos ------------------------------------------------------------------------------------

    def _photos(self, files: Sequence[Any] | None) -> tuple[list[np.ndarray], list[str]]:
        if not files:
            raise RequestError("photos", "upload 1 to 4 photos of one person")
        if len(files) > self.engine.limits.max_photos:
            raise RequestError("photos", f"at most {self.engine.limits.max_photos} photos, got {len(files)}")
        arrays, names = [], []
        for file in files:
            path = Path(file if isinstance(file, (str, os.PathLike)) else file.name)
            # Gradio's own upload copy: read as bytes, decoded in memory with the server's limits.
            arrays.append(decode_photo(path.read_bytes(), self.engine.limits, path.name))
            names.append(path.name)
        return arrays, names

    def preview(self, files: Sequence[Any] | None, choice: str, backbone: str, adapter: str):
        """Faces boxed on the photos, the face choices, the identity (analysed once) and a message."""
        import gradio as gr

        try:
            photos, names = self._photos(files)
            backend = self.engine.face_backend_for(backbone, None if adapter == "none" else adapter)
            select: str | int = "largest" if choice in (None, "", "largest") else int(choice.split()[-1]) - 1
            boxes = [self.engine.detect(photo, backend) for photo in photos]
            most = max(len(b) for b in boxes)
            choices = ["largest"] + [f"face {i + 1}" for i in range(most)]
            if isinstance(select, int) and select >= most:
                select = "largest"
            record = self.engine.analyze(photos, backend, select, names)
        except (RequestError, FastFaceError) as exc:
            return None, gr.update(choices=["largest"], value="largest"), None, _error_md(exc)
        image = _boxed(photos, boxes, record.chosen)
        found = ", ".join(f"{name}: {len(b)} face{'s' if len(b) != 1 else ''}" for name, b in zip(names, boxes))
        message = f"Identity ready ({record.backend}, {len(photos)} photo{'s' if len(photos) > 1 else ''}; {found})."
        if record.identity.outliers:
            message += f" Left out as a different person: {', '.join(record.identity.outliers)}."
        value = "largest" if select == "largest" else f"face {select + 1}"
        return image, gr.update(choices=choices, value=value), record.id, message

    # -- generation -------------------------------------------------------------------------------

    def generate(self, identity_id: str | None, prompt: str, negative: str, style: str, num_images: int,
                 seed: float, random_seed: bool, backbone: str, adapter: str, method: str,
                 compare_methods: Sequence[str], compare_backbones: Sequence[str], alpha: str, beta: str,
                 rescale: float, am_scale_down: float, am_scale_up: float, am_power: float, ip_scale: float,
                 steps: float, size: float, progress: Any = None):
        """Images (one run, or one per compared method/backbone with the same seeds), files, licence."""
        try:
            return self._generate(identity_id, prompt, negative, style, num_images, seed, random_seed, backbone,
                                  adapter, method, compare_methods, compare_backbones, alpha, beta, rescale,
                                  am_scale_down, am_scale_up, am_power, ip_scale, steps, size, progress)
        except (RequestError, FastFaceError) as exc:
            return [], [], "", _error_md(exc)

    def _generate(self, identity_id, prompt, negative, style, num_images, seed, random_seed, backbone, adapter,
                  method, compare_methods, compare_backbones, alpha, beta, rescale, am_scale_down, am_scale_up,
                  am_power, ip_scale, steps, size, progress):
        from .commands import licence_line

        if not (prompt or "").strip():
            raise RequestError("prompt", "write a prompt")
        methods = list(compare_methods) if compare_methods else [method]
        backbones = list(compare_backbones) if compare_backbones else [backbone]
        seed_value = None if random_seed else int(seed or 0)
        base = GenerationRequest(
            prompts=(apply_style(style, prompt.strip()),), negative_prompt=(negative or "").strip() or None,
            adapter=adapter or None, num_images=int(num_images), seed=seed_value,
            alpha=_parse_schedule(alpha, "alpha"), beta=_parse_schedule(beta, "beta"), rescale=_optional(rescale),
            am_scale_down=_optional(am_scale_down), am_scale_up=_optional(am_scale_up), am_power=_optional(am_power),
            ip_scale=float(ip_scale), steps=_optional(int(steps or 0)),
            height=_optional(int(size or 0)), width=_optional(int(size or 0)),
        )
        runs = []
        first_seed = None
        for b in backbones:
            for m in methods:
                request = GenerationRequest(**{**base.__dict__, "backbone": b, "method": m,
                                               "seed": base.seed if first_seed is None else first_seed})
                valid = self.engine.validate(request)
                first_seed = valid.seeds[0]  # compared runs share the seeds, random or not
                self.engine.pipeline(valid.backbone, valid.adapter)  # missing weights: fail before queueing
                runs.append((f"{b} · {m}", valid))
        if not runs:
            raise RequestError("method", "choose at least one method")
        # After the models: missing weights are said first, whatever the state of the photos.
        if not identity_id:
            raise RequestError("photos", "upload a photo with a face first")
        record = self.engine.identity(identity_id)
        identities = {}
        for _, valid in runs:
            if valid.face_backend not in identities and valid.face_backend is not None:
                identities[valid.face_backend] = (
                    record if record.backend == valid.face_backend else self._reanalyse(record, valid.face_backend))
        total_steps = sum(v.steps for _, v in runs)
        done_steps = 0
        gallery, files, licence = [], [], ""
        folder = Path(tempfile.mkdtemp(prefix="run-", dir=self.out_dir))
        for label, valid in runs:
            state = {"step": 0}
            work = Work(valid, identities.get(valid.face_backend),
                        progress=lambda step, _total, state=state: state.__setitem__("step", step))
            future = self.batcher.submit(work)
            while not future.done():
                if progress is not None:
                    progress((done_steps + state["step"], total_steps), desc=f"{label}: step {state['step']}", unit="steps")
                time.sleep(0.05)
            images = future.result()
            done_steps += valid.steps
            for image in images:
                meta = image.metadata
                name = f"{len(files) // 2:03d}_{meta['backbone']}_{meta['method']}_seed{meta['seed']}"
                png = folder / f"{name}.png"
                image.image.save(png)
                (folder / f"{name}.json").write_text(json.dumps(meta, indent=2, default=str))
                files += [str(png), str(folder / f"{name}.json")]
                gallery.append((image.image, f"{label} · seed {meta['seed']}"))
            licence = licence_line(images[0].metadata.get("licence", {}))
        return gallery, files, licence, ""

    def _reanalyse(self, record: Any, backend: str) -> Any:
        raise RequestError(
            "photos", f"this adapter needs the '{backend}' face model; the photos were analysed with "
                      f"'{record.backend}': upload them again after choosing the adapter")


def _error_md(exc: BaseException) -> str:
    return f"**Error:** {error_text(exc)}"


def _boxed(photos: Sequence[np.ndarray], boxes: Sequence[list[dict]], chosen: Sequence[int]) -> Any:
    """The photos side by side (height 256) with numbered boxes; the chosen face drawn thick."""
    from PIL import Image, ImageDraw

    tiles = []
    for photo, faces, pick in zip(photos, boxes, chosen):
        image = Image.fromarray(photo)
        scale = 256 / image.height
        image = image.resize((max(1, round(image.width * scale)), 256))
        draw = ImageDraw.Draw(image)
        for index, face in enumerate(faces):
            x0, y0, x1, y1 = (v * scale for v in face["bbox"])
            colour = BOX_COLOURS[index % len(BOX_COLOURS)]
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=4 if index == pick else 1)
            draw.text((x0 + 3, y0 + 2), str(index + 1), fill=colour)
        tiles.append(image)
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + 8 * (len(tiles) - 1), 256), "white")
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width + 8
    return sheet


def build_ui(engine: Engine, batcher: Any, *, default_backbone: str = "tiny", out_dir: Path | None = None) -> Any:
    """The Gradio Blocks of the UI on ``engine`` (whose pipeline calls all go through ``batcher``)."""
    import gradio as gr

    from .adapters import ADAPTERS
    from .backbones import BACKBONES
    from .presets import DEFAULT_IP_SCALE, DEFAULT_METHOD, METHODS

    out_dir = out_dir or Path(tempfile.mkdtemp(prefix="fastface-ui-"))
    ui = FastFaceUI(engine, batcher, default_backbone=default_backbone, out_dir=out_dir)
    backbones = list(BACKBONES)
    with gr.Blocks(title="FastFace") as blocks:
        gr.Markdown("# FastFace\nIdentity-preserving images in a few steps: upload photos of one person, "
                    "describe the picture, generate.")
        if default_backbone == "tiny":
            gr.Markdown(NOISE_BANNER, elem_id="ff-banner")
        identity = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                photos = gr.File(label="Face photos (1-4, one person)", file_count="multiple",
                                 file_types=["image"], elem_id="ff-photos")
                preview = gr.Image(label="Detected faces", type="pil", interactive=False, elem_id="ff-preview")
                face = gr.Dropdown(["largest"], value="largest", label="Face to use (when a photo has several)",
                                   elem_id="ff-face")
                status = gr.Markdown(elem_id="ff-status")
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", value="a portrait photo of a person as an astronaut",
                                    elem_id="ff-prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="ff-negative")
                with gr.Row():
                    style = gr.Dropdown(list(STYLES), value="photo", label="Style", elem_id="ff-style")
                    count = gr.Slider(1, 4, value=2, step=1, label="Images", elem_id="ff-count")
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="ff-seed")
                    random_seed = gr.Checkbox(value=False, label="Random seed", elem_id="ff-random")
                with gr.Row():
                    backbone = gr.Dropdown(backbones, value=default_backbone, label="Backbone", elem_id="ff-backbone")
                    adapter = gr.Dropdown(list(ADAPTERS), value="faceid", label="Adapter", elem_id="ff-adapter")
                    method = gr.Dropdown(list(METHODS), value=DEFAULT_METHOD, label="Method", elem_id="ff-method")
                with gr.Accordion("Compare (same seeds, side by side)", open=False):
                    compare_methods = gr.CheckboxGroup(list(METHODS), label="Methods to compare",
                                                       elem_id="ff-compare")
                    compare_backbones = gr.CheckboxGroup(backbones, label="Backbones to compare",
                                                         elem_id="ff-compare-backbones")
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        alpha = gr.Textbox(value="default", label="α (identity guidance): number or per-step list")
                        beta = gr.Textbox(value="default", label="β (text guidance): number or per-step list")
                        rescale = gr.Number(value=None, label="Rescale φ (empty: method default)")
                    with gr.Row():
                        am_down = gr.Number(value=None, label="AM scale, down blocks")
                        am_up = gr.Number(value=None, label="AM scale, up blocks")
                        am_power = gr.Number(value=None, label="AM power")
                    with gr.Row():
                        ip_scale = gr.Slider(0, 2, value=DEFAULT_IP_SCALE, step=0.05, label="Adapter scale λ")
                        steps = gr.Number(value=None, precision=0, label="Steps (empty: backbone default)")
                        size = gr.Number(value=None, precision=0, label="Size in px (empty: backbone default)")
                run = gr.Button("Generate", variant="primary", elem_id="ff-generate")
                error = gr.Markdown(elem_id="ff-error")
                gallery = gr.Gallery(label="Images", columns=4, height="auto", elem_id="ff-gallery")
                downloads = gr.File(label="Downloads: PNG + JSON metadata", file_count="multiple",
                                    interactive=False, elem_id="ff-downloads")
                licence = gr.Markdown(elem_id="ff-licence")

        analyse_inputs = [photos, face, backbone, adapter]
        analyse_outputs = [preview, face, identity, status]
        photos.change(ui.preview, analyse_inputs, analyse_outputs)
        face.input(ui.preview, analyse_inputs, analyse_outputs)
        adapter.input(ui.preview, analyse_inputs, analyse_outputs)
        backbone.input(ui.preview, analyse_inputs, analyse_outputs)

        def on_generate(identity_id, prompt_, negative_, style_, count_, seed_, random_, backbone_, adapter_,
                        method_, compare_m, compare_b, alpha_, beta_, rescale_, am_down_, am_up_, am_power_,
                        ip_scale_, steps_, size_, progress=gr.Progress()):  # noqa: B008 - Gradio's convention
            return ui.generate(identity_id, prompt_, negative_, style_, count_, seed_, random_, backbone_, adapter_,
                               method_, compare_m, compare_b, alpha_, beta_, rescale_, am_down_, am_up_, am_power_,
                               ip_scale_, steps_, size_, progress=progress)

        run.click(
            on_generate,
            [identity, prompt, negative, style, count, seed, random_seed, backbone, adapter, method,
             compare_methods, compare_backbones, alpha, beta, rescale, am_down, am_up, am_power, ip_scale, steps,
             size],
            [gallery, downloads, licence, error],
        )
    blocks.fastface_out_dir = str(out_dir)
    return blocks


def launch(*, host: str = "127.0.0.1", port: int = 7860, backbone: str | None = None, device: str | None = None,
           dtype: Any = None, fuse_loras: bool = True, block: bool = True) -> Any:
    """Start the UI (``block=False`` returns the running Blocks, for tests)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from .serve.batching import MicroBatcher
    from .serve.cli import offline

    default = backbone or ("tiny" if offline() else "hyper-4")
    limits = ServeLimits(max_images=16, max_batch_images=16)
    engine = Engine(None, limits=limits, device=device, dtype=dtype, fuse_loras=fuse_loras)
    batcher = MicroBatcher(engine.run_batch, max_batch_images=limits.max_batch_images,
                           wait_s=limits.batch_wait_ms / 1000, queue_images=limits.queue_images)
    blocks = build_ui(engine, batcher, default_backbone=default)
    blocks.queue(default_concurrency_limit=4)
    blocks.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block,
                  allowed_paths=[blocks.fastface_out_dir], show_error=True)
    return blocks
