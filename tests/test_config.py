"""GenerationConfig.validate: every rule and bound, checked before any model loads; the CLI says the same."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastface.attention import AttentionManipulation
from fastface.config import GenerationConfig, Limits
from fastface.errors import ConfigError, InputError
from fastface.guidance import GuidanceConfig

PORTRAIT = Path(__file__).resolve().parents[1] / "src" / "fastface" / "data" / "portrait.jpg"


def config(**kwargs) -> GenerationConfig:
    return GenerationConfig(**({"prompts": ("a person",), "backbone": "tiny", "device": "cpu"} | kwargs))


BAD = [
    ({"steps": 0}, ConfigError, "steps must be a positive integer, got 0"),
    ({"steps": 201}, ConfigError, "steps must be at most 200, got 201; raise the limit with --limits steps=N"),
    ({"steps": 2.5}, ConfigError, "steps must be a positive integer, got 2.5"),
    ({"width": 0}, ConfigError, "width must be a positive multiple of 16, got 0"),
    ({"height": 72}, ConfigError, "height must be a positive multiple of 16, got 72"),
    ({"width": 4112}, ConfigError, "width must be at most 4096, got 4112; raise the limit with --limits size=N"),
    ({"backbone": "hyper-4", "width": 1008}, ConfigError, "width must be a positive multiple of 32, got 1008"),
    ({"num_images": 0}, ConfigError, "num_images must be a positive integer, got 0"),
    ({"num_images": 65}, ConfigError, "at most 64 images per call, got 65; raise the limit with --limits images=N"),
    ({"prompts": ("a", "b"), "num_images": 40}, ConfigError, "at most 64 images per call, got 2 prompts × 40 images = 80"),
    ({"seed": 2**63}, ConfigError, r"seeds must be in \[0, 2\*\*63\), got 9223372036854775808"),
    ({"seed": -5}, ConfigError, r"seeds must be in \[0, 2\*\*63\), got -5"),
    ({"seed": (1, 2)}, ConfigError, "2 seeds given for 1 images"),
    ({"seed": "7"}, ConfigError, "seed must be an integer or a list of integers"),
    ({"ip_scale": -1}, ConfigError, "ip_scale must be >= 0, got -1"),
    ({"ip_scale": float("inf")}, ConfigError, "ip_scale must be a finite number, got inf"),
    ({"lora_scale": True}, ConfigError, "lora_scale must be a finite number, got True"),
    ({"device": "bogus"}, ConfigError, "unknown device 'bogus'; use auto, cpu, cuda, cuda:N or mps"),
    ({"dtype": "half"}, ConfigError, "dtype must be one of auto, float32, float16, bfloat16; got 'half'"),
    ({"backbone": "nope"}, ConfigError, "unknown backbone 'nope'"),
    ({"adapter": "nope"}, ConfigError, "unknown adapter 'nope'"),
    ({"method": "nope"}, ConfigError, "unknown method 'nope'"),
    ({"alpha": "1,2"}, ConfigError, "alpha schedule has 2 values but 4 steps are run"),
    ({"prompts": ("ok\ud83d",)}, InputError, "prompt is not valid Unicode text"),
    ({"negative_prompt": "\ud800"}, InputError, "negative_prompt is not valid Unicode text"),
    ({"identity_mode": "sum"}, ConfigError, "identity_mode must be one of mean, concat"),
    ({"adapter_options": {"pose": "x.jpg"}}, ConfigError, "unknown option.*faceid adapter: pose; it takes none"),
    # adapter options' values, before any model loads
    ({"adapter": "instantid", "adapter_options": {"controlnet_scale": -0.5}}, ConfigError,
     "controlnet_scale must be >= 0, got -0.5"),
    ({"adapter": "instantid", "adapter_options": {"controlnet_scale": float("nan")}}, ConfigError,
     "controlnet_scale must be a finite number, got nan"),
    ({"adapter": "pulid", "adapter_options": {"num_zero": -1}}, ConfigError,
     r"num_zero must be an integer in \[0, 1024\], got -1"),
    ({"adapter": "pulid", "adapter_options": {"ortho": "v3"}}, ConfigError, "ortho must be one of off, v1, v2, got 'v3'"),
    ({"attention": "strong"}, ConfigError, "attention must be an AttentionManipulation or None, got str"),
    ({"limits": Limits(max_steps=3)}, ConfigError, "steps must be at most 3, got 4"),
]


@pytest.mark.parametrize(("changes", "error", "message"), BAD)
def test_validate_refuses_with_the_message(changes, error, message):
    with pytest.raises(error, match=message):
        config(**changes).validate()


def test_valid_configuration_resolves_defaults_and_overrides():
    resolved = config(alpha="1,2,2,1", rescale=0.0, num_images=2, seed=(5, 6)).validate()
    assert (resolved.steps, resolved.height, resolved.width) == (4, 64, 64)
    assert resolved.adapter.name == "faceid" and resolved.adapter.repo == "tiny"
    assert resolved.guidance == GuidanceConfig(alpha=(1.0, 2.0, 2.0, 1.0), rescale=0.0)
    assert resolved.face_backend == "dlib"
    # Big machines raise the limits.
    big = config(steps=500, width=8192, limits=Limits.parse("steps=500,size=8192")).validate()
    assert (big.steps, big.width) == (500, 8192)
    # The call a configuration makes: its method's guidance with the overrides, its AM override.
    am = AttentionManipulation.scale_power(s_down=2.0)
    kwargs = config(method="dcg", beta=2.0, attention=am).call_kwargs(cfg_scale=5.0)
    assert kwargs["guidance"] == GuidanceConfig(beta=2.0) and kwargs["attention"] is am
    assert config(method="none").guidance(cfg_scale=5.0) == GuidanceConfig(alpha=5.0, beta=5.0, rescale=0.0)
    assert config().with_guidance(GuidanceConfig(alpha=(1, 2))).alpha == (1.0, 2.0)


def test_limits_parse_refuses_unknown_keys_and_bad_numbers():
    assert Limits.parse("images=100") == Limits(max_images=100)
    with pytest.raises(ConfigError, match="limits: expected KEY=N with KEY one of steps, size, images; got 'frames=3'"):
        Limits.parse("frames=3")
    with pytest.raises(ConfigError, match="limits: size must be an integer, got 'big'"):
        Limits.parse("size=big")
    with pytest.raises(ConfigError, match="limit max_steps must be a positive integer, got 0"):
        Limits(max_steps=0)


@pytest.mark.parametrize(
    ("args", "changes"),
    [
        (["--steps", "1000000"], {"steps": 1000000}),
        (["--seed", str(2**63)], {"seed": 2**63}),
        (["--device", "bogus"], {"device": "bogus"}),
    ],
)
def test_cli_prints_the_same_message_and_exits_2(tmp_path, args, changes):
    with pytest.raises(ConfigError) as library:
        config(**changes).validate()
    env = dict(os.environ, HF_HUB_OFFLINE="1", FASTFACE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "fastface.cli", "generate", "--face", str(PORTRAIT), "--prompt", "a person",
         "--backbone", "tiny", "--out", str(tmp_path / "out"), *args],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"error: {library.value}"]
    assert not (tmp_path / "cache").exists()  # refused before the tiny models were even built


def test_compile_is_a_configuration_field_checked_before_loading():
    from fastface.cli import build_parser
    from fastface.commands import config_from_args
    from fastface.config import GenerationConfig

    assert GenerationConfig(backbone="tiny", compile=True).compile
    args = build_parser().parse_args(["generate", "--backbone", "tiny", "--prompt", "x", "--face", "f.npy", "--out", "o.png",
                                      "--compile"])
    assert config_from_args(args).compile
    with pytest.raises(ConfigError, match="compile and cpu_offload cannot be combined"):
        GenerationConfig(backbone="tiny", compile=True, cpu_offload=True).validate()
    with pytest.raises(ConfigError, match="compile needs fused LoRAs"):
        GenerationConfig(backbone="tiny", compile=True, fuse_loras=False).validate()
