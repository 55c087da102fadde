"""The offline demo: bundled portrait → dlib embedding → tiny backbone + adapter → every method.

It exercises the whole real path (face analysis, adapter loading through diffusers, the
FastFace denoising loop) on tiny random-weight models, so it runs anywhere in seconds. The
pictures are noise-like by construction: tiny random weights show that the machinery works, not
what the method looks like.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from PIL import Image, ImageDraw

TILE = 192


def run_demo(out: Path, *, face: Path, prompt: str, seed: int = 0, progress: bool = True) -> Path:
    from .adapters import ADAPTERS
    from .commands import write_images
    from .config import GenerationConfig
    from .faces import build_identity, load_image
    from .pipeline import FastFacePipeline
    from .presets import METHODS

    out.mkdir(parents=True, exist_ok=True)
    identity = build_identity([str(face)], backend="dlib")
    rows: list[dict] = []
    shown: set[tuple[str, str]] = set()
    for adapter, spec in ADAPTERS.items():  # every registered checkpoint, on its tiny random-weight copy
        if (spec.repo, spec.weight_name) in shown:
            continue  # another mode of a checkpoint already shown (pulid-style)
        shown.add((spec.repo, spec.weight_name))
        base = GenerationConfig(prompts=(prompt,), backbone="tiny", adapter=adapter, seed=seed, device="cpu",
                                fuse_loras=False)
        pipe = FastFacePipeline.from_config(base)
        tokens = pipe.encode_identity(identity)  # once per adapter, reused by every method
        for method in METHODS:
            result = pipe.generate(base.replace(method=method), identity, identity_tokens=tokens, progress=False)
            [path] = write_images(result, out / adapter, stem=method, overwrite=True)  # the demo's own folder
            meta = result.metadata[0]
            rows.append({
                "adapter": adapter,
                "method": method,
                "path": str(path.relative_to(out)),
                "unet_evaluations": meta.get("unet_evaluations"),
                "ms": round(float(meta.get("timings_ms", {}).get("total", 0.0)), 1),
            })
            if progress:
                print(f"{adapter:>14} / {method:<18} {rows[-1]['ms']:>8.1f} ms  "
                      f"{rows[-1]['unet_evaluations']} UNet evaluations  -> {path}")
    reference = Image.fromarray(load_image(face))
    _contact_sheet(out, rows, reference).save(out / "contact_sheet.png")
    (out / "index.html").write_text(_html_page(rows, prompt, face))
    (out / "summary.json").write_text(json.dumps({"prompt": prompt, "face": str(face), "images": rows}, indent=2))
    return out


def _contact_sheet(out: Path, rows: list[dict], reference: Image.Image) -> Image.Image:
    methods = list(dict.fromkeys(row["method"] for row in rows))
    adapters = list(dict.fromkeys(row["adapter"] for row in rows))
    label_h, label_w = 28, 120
    sheet = Image.new("RGB", (label_w + TILE * (len(methods) + 1), label_h + TILE * len(adapters)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((label_w + 4, 8), "reference", fill="black")
    for col, method in enumerate(methods, start=1):
        draw.text((label_w + col * TILE + 4, 8), method, fill="black")
    for r, adapter in enumerate(adapters):
        y = label_h + r * TILE
        draw.text((4, y + TILE // 2), adapter, fill="black")
        sheet.paste(reference.convert("RGB").resize((TILE, TILE)), (label_w, y))
        for col, method in enumerate(methods, start=1):
            row = next(x for x in rows if x["adapter"] == adapter and x["method"] == method)
            tile = Image.open(out / row["path"]).convert("RGB").resize((TILE, TILE), Image.NEAREST)
            sheet.paste(tile, (label_w + col * TILE, y))
    return sheet


def _html_page(rows: list[dict], prompt: str, face: Path) -> str:
    cells = "\n".join(
        f"<tr><td>{html.escape(r['adapter'])}</td><td>{html.escape(r['method'])}</td>"
        f"<td><img src='{html.escape(r['path'])}' width='{TILE}' style='image-rendering:pixelated'></td>"
        f"<td>{r['unet_evaluations']}</td><td>{r['ms']}</td></tr>"
        for r in rows
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>FastFace demo</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:4px 10px;border-bottom:1px solid #ddd}}</style>
</head><body><h1>FastFace offline demo</h1>
<p>Prompt: <b>{html.escape(prompt)}</b>. Face: {html.escape(os.path.basename(str(face)))} (dlib 128-d embedding).</p>
<p>Tiny <em>random-weight</em> models: these images show that every stage runs, not what the method looks like.</p>
<p><img src="contact_sheet.png" style="max-width:100%"></p>
<table><tr><th>adapter</th><th>method</th><th>image</th><th>UNet evaluations</th><th>ms</th></tr>
{cells}</table></body></html>
"""
