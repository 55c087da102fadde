"""FLOP counting and the compute-bound floor, checked on cases small enough to count by hand."""

from __future__ import annotations

import pytest
import torch

from fastface.errors import ConfigError
from fastface.flops import (
    GPUS,
    FlopBudget,
    attention_flops,
    conv2d_flops,
    count_flops,
    cross_attention_layers,
    floor_ms,
    get_gpu,
    guess_gpu,
    identity_branch_flops,
    linear_flops,
    weight_stream_ms,
)
from fastface.fullsize import load_config


def test_linear_count_matches_flop_counter_on_meta():
    with torch.device("meta"):
        layer = torch.nn.Linear(48, 20)
        x = torch.empty(3, 7, 48)
    assert count_flops(lambda: layer(x)) == linear_flops(3 * 7, 48, 20)


def test_conv_count_matches_flop_counter_with_stride_and_groups():
    with torch.device("meta"):
        conv = torch.nn.Conv2d(16, 24, kernel_size=3, stride=2, padding=1, groups=4)
        x = torch.empty(2, 16, 10, 14)
    out_h, out_w = 5, 7
    assert count_flops(lambda: conv(x)) == conv2d_flops(2, 16, 24, out_h, out_w, 3, groups=4)


def test_attention_count_matches_flop_counter():
    with torch.device("meta"):
        q, k, v = torch.empty(2, 3, 50, 8), torch.empty(2, 3, 4, 8), torch.empty(2, 3, 4, 8)
    counted = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert counted == attention_flops(2, 3, 50, 4, 8)


def test_identity_branch_extra_matches_counted_projection_and_attention():
    config = {
        "block_out_channels": [8, 16],
        "layers_per_block": 1,
        "transformer_layers_per_block": [1, 2],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": 12,
    }
    height = width = 64  # latents 8x8; level 1 runs at 4x4 = 16 queries
    layers = cross_attention_layers(config)
    # down level 1: 1 layer x depth 2; mid: depth 2; up level 1: (1 + 1) layers x depth 2
    assert layers == [(16, 2)] * (2 + 2 + 4)
    with torch.device("meta"):
        k_ip = torch.nn.Linear(12, 16, bias=False)
        tokens = torch.empty(1, 4, 12)
        q = torch.empty(1, 2, 16, 8)
    one_layer = count_flops(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k_ip(tokens).view(1, 4, 2, 8).transpose(1, 2),
                                                                 k_ip(tokens).view(1, 4, 2, 8).transpose(1, 2))
    )
    assert identity_branch_flops(config, height, width, tokens=4) == len(layers) * one_layer


def test_sdxl_has_seventy_cross_attention_layers():
    layers = cross_attention_layers(load_config("unet"))
    assert len(layers) == 70
    assert sum(1 for hidden, _ in layers if hidden == 1280) == 60


def test_floor_arithmetic():
    h200 = get_gpu("H200")
    # one second of work at the datasheet peak
    assert floor_ms(h200.bf16_tflops * 1e12, h200) == pytest.approx(1000.0)
    assert floor_ms(h200.bf16_tflops * 1e12, "h200", utilisation=0.5) == pytest.approx(2000.0)
    budget = FlopBudget(1024, 1024, unet_per_evaluation=100, identity_branch_per_evaluation=5,
                        vae_decode=1000, text_encoders=30)
    assert budget.per_image(10) == 10 * 105 + 1000 + 30
    # 2.5 GB of weights at 4.8 TB/s
    assert weight_stream_ms(1_250_000_000, 2, "h200") == pytest.approx(2.5e9 / 4.8e12 * 1e3)


def test_gpu_table_and_names():
    assert guess_gpu("NVIDIA H200") == "h200"
    assert guess_gpu("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert guess_gpu("NVIDIA H100 PCIe") == "h100-pcie"
    assert guess_gpu("Some Unknown Accelerator") is None
    assert all(peak.bf16_tflops > 0 and peak.memory_tb_s > 0 for peak in GPUS.values())
    with pytest.raises(ConfigError, match="unknown GPU"):
        get_gpu("abacus")
    with pytest.raises(ConfigError, match="utilisation"):
        floor_ms(1.0, "h200", utilisation=0.0)
