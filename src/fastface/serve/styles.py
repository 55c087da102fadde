"""Style presets of the UI and the API: prompt templates around the user's prompt."""

from __future__ import annotations

from types import MappingProxyType

# "{prompt}" is replaced by the user's prompt; "none" leaves it as it is.
STYLES = MappingProxyType({
    "none": "{prompt}",
    "photo": "{prompt}, professional photo, natural light, 85mm lens, sharp focus, detailed skin",
    "cinematic": "{prompt}, cinematic still, dramatic lighting, shallow depth of field, film grain",
    "watercolour": "watercolour painting of {prompt}, soft washes, paper texture, loose brush strokes",
    "anime": "anime illustration of {prompt}, clean line art, cel shading, vibrant colours",
    "oil painting": "oil painting of {prompt}, visible brush strokes, rich colours, classical portrait",
    "comic": "comic book panel of {prompt}, bold ink outlines, halftone shading, flat colours",
})


def apply_style(style: str, prompt: str) -> str:
    """The prompt with a style's template around it (unknown style: ValueError naming the valid ones)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of: {', '.join(STYLES)}")
    return STYLES[style].replace("{prompt}", prompt)
