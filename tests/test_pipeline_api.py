"""The Python API refuses what the CLI refuses (same messages), and one pipeline is safe to share."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from fastface.attention import AttentionManipulation
from fastface.config import GenerationConfig, Limits
from fastface.errors import ConfigError, InputError
from fastface.pipeline import FastFacePipeline

PROMPT = "a photo of a person"


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return FastFacePipeline.from_pretrained("tiny", "faceid", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def embedding():
    vector = torch.randn(128, generator=torch.Generator().manual_seed(7))
    return vector / vector.norm()


def _message(exc_info: pytest.ExceptionInfo) -> str:
    return str(exc_info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 0}, "width must be a positive multiple of 16, got 0"),
        ({"height": 100000}, "height must be at most 4096, got 100000; raise the limit with --limits size=N"),
        ({"steps": 1000000}, "steps must be at most 200, got 1000000"),
        ({"steps": 0}, "steps must be a positive integer, got 0"),
        ({"num_images_per_prompt": 1000000}, "at most 64 images per call, got 1000000"),
        ({"ip_scale": -1}, "ip_scale must be >= 0, got -1"),
        ({"ip_scale": float("nan")}, "ip_scale must be a finite number, got nan"),
        ({"seed": 2**63}, r"seeds must be in \[0, 2\*\*63\), got 9223372036854775808"),
        ({"seed": -1}, r"seeds must be in \[0, 2\*\*63\), got -1"),
        ({"seed": 2**63 - 1, "num_images_per_prompt": 2}, r"seeds must be in \[0, 2\*\*63\)"),
    ],
)
def test_bad_call_values_are_the_configs_errors(pipe, embedding, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        pipe(PROMPT, embedding, output_type="latent", progress=False, **kwargs)
    # The same value in a GenerationConfig fails with the same message before any model loads.
    names = {"num_images_per_prompt": "num_images"}
    config = GenerationConfig(prompts=(PROMPT,), backbone="tiny", device="cpu",
                              **{names.get(k, k): v for k, v in kwargs.items()})
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_limits_are_options(pipe, embedding):
    result = pipe(PROMPT, embedding, output_type="latent", progress=False, steps=3,
                  limits=Limits(max_steps=3))
    assert result.metadata[0]["steps"] == 3
    with pytest.raises(ConfigError, match="steps must be at most 2, got 3; raise the limit"):
        pipe(PROMPT, embedding, output_type="latent", progress=False, steps=3, limits=Limits(max_steps=2))


@pytest.mark.parametrize(
    ("face", "error", "message"),
    [
        (np.full(128, np.nan, np.float32), InputError, "the embedding holds a zero, NaN or infinite embedding"),
        (torch.full((128,), float("inf")), InputError, "the embedding holds a zero, NaN or infinite embedding"),
        (np.zeros((2, 128), np.float32), InputError, "the embedding holds a zero, NaN or infinite embedding"),
        (42, InputError, "face must be an Identity, an embedding array or tensor.*got int"),
    ],
)
def test_bad_faces_are_one_clear_error(pipe, face, error, message):
    with pytest.raises(error, match=message):
        pipe(PROMPT, face, output_type="latent", progress=False)


def test_embedding_file_and_array_share_the_message(pipe, tmp_path):
    path = tmp_path / "zero.npy"
    np.save(path, np.zeros(128, np.float32))
    with pytest.raises(InputError, match=r"'.*zero.npy' holds a zero, NaN or infinite embedding"):
        pipe(PROMPT, str(path), output_type="latent", progress=False)


def test_text_with_a_lone_surrogate_and_bad_types(pipe, embedding):
    with pytest.raises(InputError, match="prompt is not valid Unicode text .*position 2"):
        pipe("ab\ud800c", embedding, output_type="latent", progress=False)
    with pytest.raises(InputError, match="negative_prompt is not valid Unicode text"):
        pipe(PROMPT, embedding, negative_prompt="\udfff", output_type="latent", progress=False)
    with pytest.raises(ConfigError, match="prompt must be a string or a non-empty list of strings, got 42"):
        pipe(42, embedding, output_type="latent", progress=False)


def test_device_and_dtype_names(tiny_dir):
    with pytest.raises(ConfigError, match="unknown device 'bogus'; use auto, cpu, cuda, cuda:N or mps"):
        FastFacePipeline.from_pretrained("tiny", "faceid", device="bogus")
    with pytest.raises(ConfigError, match="dtype must be one of auto, float32, float16, bfloat16; got 'half'"):
        FastFacePipeline.from_pretrained("tiny", "faceid", device="cpu", dtype="half")
    pipe = FastFacePipeline.from_pretrained("tiny", None, device="cpu", dtype="float32")
    assert pipe.dtype == torch.float32


def test_concurrent_calls_equal_sequential_calls(pipe, embedding):
    # Different LoRA weights and AM per call: overlapping calls that shared the UNet's LoRA state
    # or interleaved would mix them. Each thread's images must equal the same call made alone.
    calls = [
        {"seed": 1, "lora_scale": 1.0, "method": "fastface"},
        {"seed": 2, "lora_scale": 0.0, "method": "dcg", "ip_scale": 0.3},
        {"seed": 3, "lora_scale": 0.5, "method": "am",
         "attention": AttentionManipulation.scale_power(s_down=3.0, s_up=3.0)},
    ]
    kwargs = {"output_type": "latent", "progress": False, "steps": 4}
    sequential = [pipe(PROMPT, embedding, **kwargs, **call).latents for call in calls]
    barrier = threading.Barrier(len(calls))
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[index] = pipe(PROMPT, embedding, **kwargs, **calls[index]).latents
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    for index, expected in enumerate(sequential):
        assert torch.equal(results[index], expected), f"call {index} differs when run concurrently"


def test_am_targets_every_identity_token_by_default(pipe):
    # Two photos in concat mode: S = 8 tokens. The default manipulates all 8 (the published
    # [0, 1, 2, 3] is the 4-token case), the same as naming all 8, unlike naming the first 4.
    rng = np.random.default_rng(3)
    two_photos = rng.standard_normal((2, 128)).astype(np.float32)
    kwargs = {"output_type": "latent", "progress": False, "identity_mode": "concat", "method": "am", "seed": 4}
    default = pipe(PROMPT, two_photos, **kwargs)
    assert default.metadata[0]["identity"]["num_tokens"] == 8
    assert default.metadata[0]["attention"]["tokens"] is None
    every = pipe(PROMPT, two_photos, attention=AttentionManipulation.scale_power(tokens=range(8)), **kwargs)
    first_four = pipe(PROMPT, two_photos, attention=AttentionManipulation.scale_power(tokens=[0, 1, 2, 3]), **kwargs)
    # Every token (None) runs the fused scale-power kernel, a token list the reference map: equal to 1e-5.
    torch.testing.assert_close(default.latents, every.latents, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(default.latents, first_four.latents, atol=1e-4)


def test_branch_extras_reach_the_unet_with_each_branch_identity(pipe, embedding):
    # An adapter that adds a UNet input per batched call (as InstantID's ControlNet does) through the seam.
    from fastface.adapters import load_adapter
    from fastface.adapters.faceid import FaceIDAdapter
    from fastface.backbones import get_backbone, load_backbone

    class WithExtras(FaceIDAdapter):
        uses_branch_extras = True

        def __init__(self, base, strength):
            super().__init__(base.spec, base.projection, base.checkpoint)
            self.strength, self.calls = strength, []

        def branch_extras(self, call):
            self.calls.append(call)
            # One value per row: + strength where the row's branch has the identity, 0 for ∅.
            per_row = torch.tensor([float(with_id) for _, with_id in call.conditions]).repeat_interleave(call.count)
            residual = self.strength * per_row.view(-1, 1, 1, 1).expand(-1, 64, 4, 4)
            # The tiny UNet's skip connections (conv_in, 2 resnets + downsample, 2 attention blocks).
            shapes = [(32, 8, 8)] * 3 + [(32, 4, 4)] + [(64, 4, 4)] * 2
            down = tuple(torch.zeros(len(per_row), *shape, dtype=call.sample.dtype) for shape in shapes)
            return {"down_block_additional_residuals": down,
                    "mid_block_additional_residual": residual.to(call.sample.dtype)}

        def extra_evaluations(self, conditions, count):
            return {"controlnet": len(conditions) * count}

    sdxl = load_backbone("tiny", device="cpu", dtype=torch.float32)
    silent_adapter = WithExtras(load_adapter(sdxl, "faceid", backbone="tiny"), 0.0)
    silent = FastFacePipeline(sdxl, get_backbone("tiny"), silent_adapter)
    kwargs = {"output_type": "latent", "progress": False, "seed": 5, "num_images_per_prompt": 2}
    result = silent(PROMPT, embedding, **kwargs)
    # Zero residuals: exactly the plain pipeline (the module fixture), so the call path is the same.
    torch.testing.assert_close(result.latents, pipe(PROMPT, embedding, **kwargs).latents, rtol=0, atol=1e-6)
    meta = result.metadata[0]
    assert meta["extra_evaluations"] == {"controlnet": meta["unet_evaluations"]}
    tokens = silent.encode_identity(embedding)
    for call in silent_adapter.calls:
        assert call.count == 2 and call.sample.shape[0] == 2 * len(call.conditions)
        for chunk, (_, with_id) in zip(call.identity_tokens.chunk(len(call.conditions)), call.conditions):
            expected = tokens.cond if with_id else tokens.null
            assert torch.equal(chunk, expected.expand(2, -1, -1))
    silent_adapter.strength = 0.5
    assert not torch.allclose(silent(PROMPT, embedding, **kwargs).latents, result.latents, atol=1e-3)
