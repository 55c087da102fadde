"""PuLID's networks (EVA02-CLIP tower, ID encoders, BiSeNet, identity attention) against the formulas.

Each module is checked against an independent straightforward computation written here from the
published definitions (loops over heads, complex-number rotations, explicit softmax), on the tiny
random weights in the official key layouts from :mod:`fastface.testing`. (During development
the same weights were also run through the official PuLID / facexlib modules: max relative
difference 8e-7 for the EVA tower, 5e-7 for BiSeNet, 0 for both encoders.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastface.attention import AttentionManipulation
from fastface.models.eva_clip import EVAVisionTower
from fastface.models.face_parsing import BiSeNet, face_only_gray
from fastface.models.pulid_attention import add_identity, identity_attention, ortho_v2_mass, pad_tokens
from fastface.models.pulid_encoders import IDEncoder, IDFormer, load_id_encoder
from fastface.testing import (
    EVA_CLIP_FILE,
    PARSING_FILE,
    PULID_V1_FILE,
    PULID_V11_FILE,
    TINY_EVA,
    tiny_pulid_dir,
)


@pytest.fixture(scope="module")
def pulid_dir(tmp_path_factory):
    return tiny_pulid_dir(tmp_path_factory.getbasetemp() / "fastface-cache")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _ln(x, sd, key, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{key}.weight"], sd[f"{key}.bias"], eps)


def _lin(x, sd, key):
    return F.linear(x, sd[f"{key}.weight"], sd.get(f"{key}.bias"))


def _eva_reference(sd: dict, pixels: torch.Tensor, head_dim: int = 64):
    """EVA02 forward from the definitions: per-head loops, rotary position as complex rotation."""
    sd = {k[len("visual."):]: v.double() for k, v in sd.items() if k.startswith("visual.")}
    x = F.conv2d(pixels.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=TINY_EVA["patch"])
    grid = x.shape[-1]
    x = torch.cat([sd["cls_token"].expand(x.shape[0], 1, -1), x.flatten(2).transpose(1, 2)], dim=1) + sd["pos_embed"]
    # rotary angles: position p of a 16-cell pre-training grid, half the head for rows, half for columns
    quarter = head_dim // 4
    freqs = torch.tensor([10000.0 ** (-2 * i / (head_dim // 2)) for i in range(quarter)], dtype=torch.float64)
    rows = torch.arange(grid, dtype=torch.float64).repeat_interleave(grid) / grid * 16
    cols = torch.arange(grid, dtype=torch.float64).repeat(grid) / grid * 16
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)  # (grid², head_dim/2)
    rotation = torch.polar(torch.ones_like(angles), angles)

    def rotate(t):  # t (N_patches, head_dim): adjacent channel pairs are complex numbers
        return torch.view_as_real(torch.view_as_complex(t.reshape(t.shape[0], -1, 2).contiguous()) * rotation).flatten(1)

    hidden = []
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for b in range(depth):
        if b in (4, 8, 12, 16, 20):
            hidden.append(x.clone())
        p = f"blocks.{b}"
        y = _ln(x, sd, f"{p}.norm1", 1e-6)
        q = y @ sd[f"{p}.attn.q_proj.weight"].T + sd[f"{p}.attn.q_bias"]
        k = y @ sd[f"{p}.attn.k_proj.weight"].T
        v = y @ sd[f"{p}.attn.v_proj.weight"].T + sd[f"{p}.attn.v_bias"]
        heads = []
        for n in range(x.shape[0]):
            per_sample = []
            for h in range(q.shape[-1] // head_dim):
                sl = slice(h * head_dim, (h + 1) * head_dim)
                qh, kh, vh = q[n, :, sl].clone(), k[n, :, sl].clone(), v[n, :, sl]
                qh[1:], kh[1:] = rotate(qh[1:]), rotate(kh[1:])
                weights = torch.softmax(qh @ kh.T / math.sqrt(head_dim), dim=-1)
                per_sample.append(weights @ vh)
            heads.append(torch.cat(per_sample, dim=-1))
        attn = torch.stack(heads)
        x = x + _lin(_ln(attn, sd, f"{p}.attn.inner_attn_ln", 1e-6), sd, f"{p}.attn.proj")
        y = _ln(x, sd, f"{p}.norm2", 1e-6)
        gated = F.silu(_lin(y, sd, f"{p}.mlp.w1")) * _lin(y, sd, f"{p}.mlp.w2")
        x = x + _lin(_ln(gated, sd, f"{p}.mlp.ffn_ln", 1e-6), sd, f"{p}.mlp.w3")
    return _lin(_ln(x, sd, "norm", 1e-6)[:, 0], sd, "head"), hidden


def test_eva_clip_tower_matches_the_definition(pulid_dir):
    sd = torch.load(pulid_dir / EVA_CLIP_FILE, weights_only=True)
    tower = EVAVisionTower.from_state_dict(sd)  # official layout: visual.* with stored rotary tables
    assert (tower.width, tower.depth, tower.image_size, tower.embed_dim) == (128, 21, 28, 32)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cls, hidden = tower(pixels)
    ref_cls, ref_hidden = _eva_reference(sd, pixels)
    assert cls.shape == (2, 32) and len(hidden) == 5 and hidden[0].shape == (2, 5, 128)
    assert _rel(cls.double(), ref_cls) < 1e-5
    for ours, ref in zip(hidden, ref_hidden):
        assert _rel(ours.double(), ref) < 1e-5
    # the hidden states differ per block (they are read at different depths)
    assert not torch.allclose(hidden[0], hidden[4])


def test_eva_clip_loads_a_whole_clip_checkpoint_and_refuses_a_foreign_one(pulid_dir):
    sd = torch.load(pulid_dir / EVA_CLIP_FILE, weights_only=True)
    whole = {**sd, "text.token_embedding.weight": torch.zeros(3, 4), "logit_scale": torch.tensor(1.0)}
    tower = EVAVisionTower.from_state_dict({"state_dict": whole})
    assert torch.equal(tower.head.weight, sd["visual.head.weight"])
    with pytest.raises(ValueError, match="not an EVA02-CLIP"):
        EVAVisionTower.from_state_dict({"visual.blocks.0.norm1.weight": torch.ones(3)})
    broken = dict(sd)
    del broken["visual.blocks.3.mlp.w3.bias"]
    with pytest.raises(RuntimeError, match="w3.bias"):
        EVAVisionTower.from_state_dict(broken)


def _mlp_ref(x, sd, prefix, n_linear):
    for i in range(n_linear):
        x = _lin(x, sd, f"{prefix}.{3 * i}")
        if i < n_linear - 1:
            x = F.leaky_relu(_ln(x, sd, f"{prefix}.{3 * i + 1}", 1e-5), 0.01)
    return x


def _hidden(generator, batch=1, tokens=5):
    return [torch.randn(batch, tokens, 128, generator=generator) for _ in range(5)]


def test_id_encoder_v1_matches_the_definition(pulid_dir):
    raw = torch.load(pulid_dir / PULID_V1_FILE, weights_only=True)
    encoder = load_id_encoder(raw)
    assert isinstance(encoder, IDEncoder) and encoder.num_tokens == 10
    sd = {k[len("id_adapter."):]: v for k, v in raw.items() if k.startswith("id_adapter.")}
    g = torch.Generator().manual_seed(1)
    cond, hidden = torch.randn(1, 160, generator=g), _hidden(g)
    with torch.no_grad():
        out = encoder(cond, hidden)
    tokens = [_mlp_ref(cond, sd, "body", 3).reshape(5, 64)]
    for i, h in enumerate(hidden):
        cls_part = _mlp_ref(h[0, 0], sd, f"mapping_{i}", 3)
        patch_part = torch.stack([_mlp_ref(h[0, j], sd, f"mapping_patch_{i}", 3) for j in range(1, 5)]).mean(0)
        tokens.append((cls_part + patch_part)[None])
    assert out.shape == (1, 10, 64)
    assert _rel(out[0], torch.cat(tokens)) < 1e-5


def _idformer_ref(sd, cond, hidden, photos=1):
    """IDFormer from the definition, one head at a time."""
    x = _mlp_ref(cond, sd, "id_embedding_mapping", 3).reshape(5 * photos, 64)
    latents = torch.cat([sd["latents"][0], x])
    for i in range(5):
        context = torch.cat([x, _mlp_ref(hidden[i][0], sd, f"mapping_{i}", 3)])
        for layer in (2 * i, 2 * i + 1):
            p = f"layers.{layer}"
            c, lat = _ln(context, sd, f"{p}.0.norm1", 1e-5), _ln(latents, sd, f"{p}.0.norm2", 1e-5)
            q = lat @ sd[f"{p}.0.to_q.weight"].T
            k, v = (torch.cat([c, lat]) @ sd[f"{p}.0.to_kv.weight"].T).chunk(2, dim=-1)
            heads = [torch.softmax(q[:, s] @ k[:, s].T / 8.0, dim=-1) @ v[:, s]
                     for s in (slice(0, 64), slice(64, 128))]
            latents = latents + torch.cat(heads, dim=-1) @ sd[f"{p}.0.to_out.weight"].T
            y = _ln(latents, sd, f"{p}.1.0", 1e-5) @ sd[f"{p}.1.1.weight"].T
            latents = latents + F.gelu(y) @ sd[f"{p}.1.3.weight"].T
    return latents[:32] @ sd["proj_out"]


def test_id_former_v11_matches_the_definition_for_one_and_two_photos(pulid_dir):
    from safetensors.torch import load_file

    raw = load_file(str(pulid_dir / PULID_V11_FILE))
    encoder = load_id_encoder(raw)
    assert isinstance(encoder, IDFormer) and encoder.num_tokens == 32
    sd = {k[len("id_adapter."):]: v for k, v in raw.items() if k.startswith("id_adapter.")}
    g = torch.Generator().manual_seed(2)
    cond, hidden = torch.randn(1, 160, generator=g), _hidden(g)
    with torch.no_grad():
        out = encoder(cond, hidden)
        two = encoder(torch.randn(1, 2, 160, generator=g), two_hidden := _hidden(g, tokens=10))
    assert out.shape == (1, 32, 64) and two.shape == (1, 32, 64)
    assert _rel(out[0], _idformer_ref(sd, cond, hidden)) < 1e-5
    g = torch.Generator().manual_seed(2)
    torch.randn(1, 160, generator=g), _hidden(g)
    cond2 = torch.randn(1, 2, 160, generator=g)
    assert _rel(two[0], _idformer_ref(sd, cond2[0], two_hidden, photos=2)) < 1e-5


def test_bisenet_loads_facexlib_layout_and_masks_like_pulid(pulid_dir):
    sd = torch.load(pulid_dir / PARSING_FILE, weights_only=True)
    parser = BiSeNet.from_state_dict(sd)
    rgb = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = parser(rgb)
        again = BiSeNet.from_state_dict({f"module.{k}": v for k, v in sd.items()})(rgb)
    assert logits.shape == (1, 19, 64, 64) and torch.equal(logits, again)
    # full-size facexlib layout: 64/128/256/512 ResNet-18 with its key names
    full = BiSeNet()
    assert len(full.state_dict()) == 191 and "cp.resnet.layer4.0.downsample.1.running_var" in full.state_dict()
    masked = face_only_gray(rgb, logits)
    labels = logits.argmax(1, keepdim=True)
    background = sum(labels == i for i in (0, 16, 18, 7, 8, 9, 14, 15)).bool()
    gray = 0.299 * rgb[:, :1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:]
    assert torch.equal(masked[:, :1][background], torch.ones_like(gray[background]))
    assert torch.allclose(masked[:, 2:][~background], gray[~background])
    with pytest.raises(ValueError, match="not a BiSeNet"):
        BiSeNet.from_state_dict({"conv.weight": torch.ones(1)})


def _qkv(seed, batch=2, heads=2, length=6, tokens=4, dim=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=g)
    k = torch.randn(batch, heads, tokens, dim, generator=g)
    v = torch.randn(batch, heads, tokens, dim, generator=g)
    return q, k, v


def test_zero_padding_takes_softmax_mass_and_am_leaves_it():
    q, k, v = _qkv(4)
    real = 4
    assert torch.equal(pad_tokens(k[0], 3), torch.cat([k[0], torch.zeros(2, 3, 8)], dim=1))
    # keys and values of zero tokens are zero (PuLID's id_to_k / id_to_v have no bias)
    kp, vp = (torch.cat([t, torch.zeros(2, 2, 3, 8)], dim=2) for t in (k, v))
    plain = identity_attention(q, kp, vp, real)
    scores = q @ kp.transpose(-1, -2) / math.sqrt(8)
    probs = scores.softmax(-1)
    assert torch.allclose(plain, probs @ vp, atol=1e-6)
    assert torch.allclose(plain, (probs[..., :real] @ v), atol=1e-6)  # padding values are zero
    am = AttentionManipulation.scale_power()
    out = identity_attention(q, kp, vp, real, am, part="down", step=0)
    manipulated = torch.clamp(1.55 * probs[..., :real] ** 1.3, max=10.0)
    assert torch.allclose(out, manipulated @ v, atol=1e-6)
    # the manipulation uses PuLID's softmax over real + padding tokens, not one over the real ones
    assert not torch.allclose(out, torch.clamp(1.55 * (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1) ** 1.3, max=10.0) @ v)
    assert torch.equal(identity_attention(q, kp, vp, real, am, part="mid", step=0), plain)  # mid not targeted
    # softmask inverts the first token of every photo's group: two photos of 2 tokens differ from one of 4
    soft = AttentionManipulation.softmask()
    one = identity_attention(q, kp, vp, real, soft, part="down", step=1, tokens_per_photo=4)
    two = identity_attention(q, kp, vp, real, soft, part="down", step=1, tokens_per_photo=2)
    assert torch.isfinite(one).all() and not torch.allclose(one, two)
    assert torch.equal(identity_attention(q, kp, vp, real, soft, part="down", step=1), one)  # default: one photo


def test_orthogonal_joins():
    g = torch.Generator().manual_seed(5)
    hidden, ident = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    assert torch.allclose(add_identity(hidden, ident, 0.7), hidden + 0.7 * ident)
    v1 = add_identity(hidden, ident, 0.7, "v1") - hidden
    # v1 adds only what is orthogonal to H, per sample and channel over the query positions
    assert torch.allclose((v1 * hidden).sum(dim=1), torch.zeros(2, 8), atol=1e-5)
    mass = torch.rand(2, 6, 1, generator=g)
    v2 = add_identity(hidden, ident, 0.7, "v2", mass) - hidden
    coeff = (hidden * ident).sum(1, keepdim=True) / (hidden * hidden).sum(1, keepdim=True)
    assert torch.allclose(v2, 0.7 * (ident + (mass - 1) * coeff * hidden), atol=1e-6)
    q, k, _ = _qkv(6, tokens=9)
    expected = (q @ k.transpose(-1, -2)).softmax(-1).mean(1)[..., :5].sum(-1, keepdim=True)
    assert torch.allclose(ortho_v2_mass(q, k), expected)
    # a zero text output (null text = zero embeddings): nothing to project on, no NaN
    zero = torch.zeros_like(hidden)
    assert torch.equal(add_identity(zero, ident, 0.7, "v1"), 0.7 * ident)
    assert torch.equal(add_identity(zero, ident, 0.7, "v2", mass), 0.7 * ident)
    with pytest.raises(ValueError, match="mass"):
        add_identity(hidden, ident, 0.7, "v2")


def test_eva_pixels_resize_and_normalise(pulid_dir):
    from fastface.models.pulid_face import align_face_512, eva_pixels

    parser = BiSeNet.from_state_dict(torch.load(pulid_dir / PARSING_FILE, weights_only=True))
    rng = np.random.default_rng(0)
    photo = (rng.random((300, 260, 3)) * 255).astype(np.uint8)
    template = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                         [201.26117, 371.41043], [313.08905, 371.15118]])
    kps = template * 0.5 + (10, 5)  # a face at half the template's scale
    face = align_face_512(photo, kps)
    assert face.shape == (512, 512, 3)
    # the keypoints land on the FFHQ template: the left eye's pixels are copied there
    photo[124:127, 105:108] = (255, 0, 0)
    assert tuple(align_face_512(photo, kps)[240, 193]) == (255, 0, 0)
    # outside the photo: facexlib's grey
    assert tuple(align_face_512(photo, kps + 2000)[500, 500]) == (132, 133, 135)
    pixels = eva_pixels(face, parser, 28)
    assert pixels.shape == (1, 3, 28, 28)
    # grey face on white: after undoing CLIP's normalisation the three channels are equal
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    plain = pixels * std + mean
    assert torch.allclose(plain[:, 0], plain[:, 1], atol=1e-5) and torch.allclose(plain[:, 0], plain[:, 2], atol=1e-5)
    assert plain.std() > 0.01
