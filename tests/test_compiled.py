"""The compiled path on the CPU: compiled == eager, and per-call numbers cause no recompilation.

torch.compile runs here with the ``eager`` backend: dynamo captures the whole UNet / VAE graph and
installs its guards exactly as for inductor (so graph counts and recompilations are the real ones),
then runs the captured graph without generating code. Inductor needs minutes of C++ compilation
on this 2-core machine, and ``aot_eager`` trips over a torch CPU bug in the SDXL VAE's group norm
(``native_group_norm`` on a non-contiguous input); the GPU script (benchmarks/gpu_run.sh) compiles
with inductor.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from fastface.attention import AttentionManipulation
from fastface.compiled import CompiledModels, RecompileWarning
from fastface.errors import ConfigError
from fastface.pipeline import FastFacePipeline

PROMPT = "a portrait photo"


@pytest.fixture(scope="module")
def embedding():
    return np.random.default_rng(5).standard_normal(128).astype(np.float32)


def test_compiled_equals_eager_and_numbers_do_not_recompile(tiny_dir, embedding):
    pipe = FastFacePipeline.from_pretrained("tiny", "faceid", device="cpu", dtype=torch.float32)
    pipe.fuse_loras()
    pipe.set_am_kernel("fused")
    other_am = AttentionManipulation.scale_power(s_down=2.5, s_up=0.9, power=1.7)
    eager = pipe(PROMPT, embedding, output_type="np", progress=False)
    eager_other = pipe(PROMPT, embedding, ip_scale=0.35, attention=other_am, output_type="latent", progress=False)

    pipe.compile(backend="eager")
    assert pipe.compiled and pipe.am_kernel == "fused"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecompileWarning)
        first = pipe(PROMPT, embedding, output_type="np", progress=False)
        report = pipe.compile_report()
        # fastface's steps batch 2 and 3 samples: one graph for both (dynamic batch axis)
        assert report["unet"]["graphs"] == 1 and report["unet"]["calls"] == 4 and report["vae"]["graphs"] == 1
        # another adapter scale and other AM numbers: the same graphs
        other = pipe(PROMPT, embedding, ip_scale=0.35, attention=other_am, output_type="latent", progress=False)
        report = pipe.compile_report()
    # (a batch of one, e.g. method none with one image, would be the one expected extra graph:
    # torch specialises size-1 axes; left out here, each graph costs seconds to capture)
    assert report["unet"]["graphs"] == 1 and report["unet"]["unexpected"] == {}
    assert report["unet"]["calls"] == 8
    torch.testing.assert_close(first.latents, eager.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other.latents, eager_other.latents, rtol=1e-5, atol=1e-5)
    assert np.abs(first.images[0] - eager.images[0]).max() < 1e-4
    assert (other.latents - first.latents).abs().max() > 1e-2  # the numbers did reach the graph
    assert first.metadata[0]["compiled"]["backend"] == "eager"
    with pytest.raises(ConfigError, match="cpu_offload"):
        pipe.enable_model_cpu_offload("cuda")


class _Branchy(torch.nn.Module):
    """A model whose graph depends on a Python int: each new value is a new graph."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *, mode: int = 0) -> torch.Tensor:
        out = self.linear(sample.transpose(1, -1)).transpose(1, -1) * timestep
        return out + 1 if mode == 0 else out - 1


def test_a_recompile_beyond_the_expected_set_is_reported_never_silent():
    model = _Branchy()
    compiled = CompiledModels(model, None, backend="eager", expected_per_shape=1)
    sample, t = torch.randn(2, 4, 3, 3), torch.tensor(1.0)
    torch.testing.assert_close(compiled.unet(sample, t, mode=0), model(sample, t, mode=0))
    assert compiled.logs["unet"].count == 1
    with pytest.warns(RecompileWarning, match="graph 2"):
        got = compiled.unet(sample, t, mode=1)
    torch.testing.assert_close(got, model(sample, t, mode=1))
    strict = CompiledModels(model, None, backend="eager", expected_per_shape=1, strict=True)
    strict.unet(sample, t, mode=0)
    with pytest.raises(ConfigError, match="expected at most 1 per size"):
        strict.unet(sample, t, mode=2)
    with pytest.raises(ConfigError, match="compile backend"):
        CompiledModels(model, None, backend="tvm")
    with pytest.raises(ConfigError, match="needs the inductor backend"):
        CompiledModels(model, None, backend="eager", mode="reduce-overhead")
