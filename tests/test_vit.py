import math

import pytest
import torch
import torch.nn as nn

from machinery.pretrained import adapt_timm_state_dict, resample_pos_embed
from vit import VARIANTS, VisionTransformer, ViTConfig


def small_cfg(**kw):
    base = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3, num_local=5, num_global=2)
    base.update(kw)
    return ViTConfig(**base)


def timm_vit_tiny_shapes(in_chans):
    """timm's vit_tiny_patch16_224 state_dict, written out by hand (no timm import)."""
    D, depth, hidden = 192, 12, 768
    shapes = {
        "cls_token": (1, 1, D),
        "pos_embed": (1, 197, D),
        "patch_embed.proj.weight": (D, in_chans, 16, 16),
        "patch_embed.proj.bias": (D,),
        "norm.weight": (D,),
        "norm.bias": (D,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update({
            p + "norm1.weight": (D,), p + "norm1.bias": (D,),
            p + "attn.qkv.weight": (3 * D, D), p + "attn.qkv.bias": (3 * D,),
            p + "attn.proj.weight": (D, D), p + "attn.proj.bias": (D,),
            p + "norm2.weight": (D,), p + "norm2.bias": (D,),
            p + "mlp.fc1.weight": (hidden, D), p + "mlp.fc1.bias": (hidden,),
            p + "mlp.fc2.weight": (D, hidden), p + "mlp.fc2.bias": (D,),
        })
    return shapes


def test_vit_tiny_state_dict_has_timm_keys_and_shapes():
    model = VisionTransformer(ViTConfig(**VARIANTS["vit_tiny"]))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    heads = {"head_local.weight": (22, 192), "head_local.bias": (22,), "head_global.weight": (2, 192),
             "head_global.bias": (2,)}
    assert ours == {**timm_vit_tiny_shapes(in_chans=1), **heads}


def test_timm_rgb_state_dict_loads_and_matches_the_rgb_model_on_a_gray_image():
    torch.manual_seed(0)
    # a timm-named RGB checkpoint trained at another size (8 x 8 grid), with an ImageNet head
    rgb = VisionTransformer(small_cfg(in_chans=3, img_size=64)).eval()
    timm_like = {k: v for k, v in rgb.state_dict().items() if not k.startswith("head_")}
    timm_like["patch_embed.proj.bias"] = torch.randn(24)
    timm_like["head.weight"], timm_like["head.bias"] = torch.randn(1000, 24), torch.randn(1000)
    rgb.load_state_dict(timm_like, strict=False)
    gray = VisionTransformer(small_cfg(img_size=64)).eval()
    converted, report = adapt_timm_state_dict(timm_like, gray, "imagenet", input_norm=(0.5, 0.25))
    missing, unexpected = gray.load_state_dict(converted, strict=False)
    assert sorted(missing) == ["head_global.bias", "head_global.weight", "head_local.bias", "head_local.weight"]
    assert unexpected == []
    assert sorted(report["converted"]) == ["patch_embed.proj.bias", "patch_embed.proj.weight"]
    assert sorted(report["dropped"]) == ["head.bias", "head.weight"]
    gray.head_local.load_state_dict(rgb.head_local.state_dict()), gray.head_global.load_state_dict(rgb.head_global.state_dict())
    g = torch.rand(2, 1, 64, 64)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        ours = gray((g - 0.5) / 0.25)  # our normalization, folded into the patch embedding
        theirs = rgb((g.expand(-1, 3, -1, -1) - mean) / std)  # the checkpoint's own normalization, on (g, g, g)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-4, rtol=1e-4)
    # at another grid, pos_embed is resampled and the model still runs
    small = VisionTransformer(small_cfg())
    converted, report = adapt_timm_state_dict(timm_like, small)
    assert "pos_embed" in report["converted"] and converted["pos_embed"].shape == (1, 17, 24)
    small.load_state_dict(converted, strict=False)
    assert torch.isfinite(small(torch.randn(2, 1, 32, 32))[0]).all()


def test_a_checkpoint_of_another_width_or_a_cnn_fails_clearly():
    model = VisionTransformer(small_cfg())
    wider = VisionTransformer(small_cfg(embed_dim=48, num_heads=3)).state_dict()
    with pytest.raises(ValueError, match=r"checkpoint does not fit this model: \S+ is \(.*48\), the model has"):
        adapt_timm_state_dict(wider, model)
    with pytest.raises(ValueError, match="not a timm/DeiT ViT state_dict"):
        adapt_timm_state_dict({"conv1.weight": torch.randn(64, 3, 7, 7), "fc.weight": torch.randn(1000, 2048)}, model)


def test_a_distilled_deit_checkpoint_loads_without_its_distillation_token():
    # timm's deit_*_distilled: a dist_token, a head_dist, and a pos_embed of class, distillation and patch slots
    torch.manual_seed(0)
    plain = VisionTransformer(small_cfg(in_chans=3, img_size=64))  # an 8 x 8 grid
    state = {k: v for k, v in plain.state_dict().items() if not k.startswith("head_")}
    cls_slot, patches = state["pos_embed"][:, :1], state["pos_embed"][:, 1:]
    state["pos_embed"] = torch.cat([cls_slot, torch.full((1, 1, 24), 7.0), patches], dim=1)  # (1, 2 + 64, D)
    state["dist_token"] = torch.randn(1, 1, 24)
    state["head.weight"], state["head.bias"] = torch.randn(1000, 24), torch.randn(1000)
    state["head_dist.weight"], state["head_dist.bias"] = torch.randn(1000, 24), torch.randn(1000)
    model = VisionTransformer(small_cfg(img_size=64))
    converted, report = adapt_timm_state_dict(state, model)
    assert converted["pos_embed"].shape == (1, 65, 24)
    torch.testing.assert_close(converted["pos_embed"], torch.cat([cls_slot, patches], dim=1))  # the same grid: no resampling
    assert sorted(report["dropped"]) == ["dist_token", "head.bias", "head.weight", "head_dist.bias", "head_dist.weight",
                                         "pos_embed[:, 1] (the distillation token's slot)"]
    smaller = VisionTransformer(small_cfg())  # 4 x 4: the 8 x 8 patch slots resampled after the slot is dropped
    converted, _ = adapt_timm_state_dict(state, smaller)
    assert converted["pos_embed"].shape == (1, 17, 24)
    torch.testing.assert_close(converted["pos_embed"][:, :1], cls_slot)


def test_a_position_grid_that_is_not_square_is_a_value_error_not_an_assertion():
    with pytest.raises(ValueError, match="pos_embed holds 10 patch positions after 1 prefix slot"):
        resample_pos_embed(torch.randn(1, 11, 8), 4)


def test_forward_shapes_and_attention_rows_sum_to_one():
    cfg = small_cfg()
    model = VisionTransformer(cfg)
    local, glob, attns = model(torch.randn(3, 1, 32, 32), return_attn=True)
    assert local.shape == (3, 5) and glob.shape == (3, 2)
    assert len(attns) == cfg.depth
    for a in attns:
        assert a.shape == (3, 3, 17, 17)  # (B, heads, T, T) with T = 1 + (32/8)^2
        torch.testing.assert_close(a.sum(-1), torch.ones(3, 3, 17))
        assert a.requires_grad  # a training target: not detached
    assert model(torch.randn(1, 1, 32, 32))[2] == []


def test_fused_and_explicit_paths_agree():
    torch.manual_seed(0)
    model = VisionTransformer(small_cfg()).eval()
    x = torch.randn(4, 1, 32, 32)
    fused = model(x, return_attn=False)
    explicit = model(x, return_attn=True)
    torch.testing.assert_close(fused[0], explicit[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[1], explicit[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stem", [(), (4, 6)])
def test_a_token_sees_its_own_patch(stem):
    # a change inside one 8 x 8 patch moves that patch's token; others move only through the stem's GroupNorm,
    # which standardizes each feature map over the whole image (a plain ViT: not at all)
    torch.manual_seed(0)
    embed = VisionTransformer(small_cfg(stem_chans=stem)).patch_embed
    assert embed.grid_size == 4 and len(embed.backbone) == 3 * len(stem)  # conv, norm, GELU per stem layer
    x = torch.randn(2, 1, 32, 32)
    y = x.clone()
    y[:, :, 8:16, 16:24] += torch.randn(2, 1, 8, 8)  # patch (row 1, column 2) of the 4 x 4 grid
    moved = (embed(y) - embed(x)).abs().amax(dim=(0, 2))  # (N,)
    others = moved[torch.arange(16) != 1 * 4 + 2].max()
    assert others == 0 if not stem else moved[6] > 3 * others, (moved[6], others)
    keys = VisionTransformer(small_cfg(stem_chans=stem)).state_dict()
    assert any(k.startswith("patch_embed.backbone") for k in keys) == bool(stem)  # a plain ViT keeps timm's keys


def test_max_pooling_heads_read_the_largest_patch_feature():
    torch.manual_seed(0)
    model = VisionTransformer(small_cfg(global_pool="max")).eval()
    x = torch.randn(3, 1, 32, 32)
    captured = {}
    model.norm.register_forward_hook(lambda module, args, out: captured.update(tokens=out))
    local, glob, _ = model(x)
    pooled = captured["tokens"][:, 1:].amax(dim=1)  # the class token (index 0) is not pooled
    torch.testing.assert_close(local, model.head_local(pooled))
    torch.testing.assert_close(glob, model.head_global(pooled))
    with pytest.raises(AssertionError, match="global_pool"):
        VisionTransformer(small_cfg(global_pool="avg"))


def test_block_matches_torch_transformer_encoder_layer():
    torch.manual_seed(0)
    cfg = small_cfg(embed_dim=32, num_heads=4)
    block = VisionTransformer(cfg).blocks[0].eval()
    ref = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=128, dropout=0.0, activation="gelu",
                                     layer_norm_eps=1e-6, batch_first=True, norm_first=True).eval()
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(block.attn.qkv.weight)  # both ordered q | k | v
        ref.self_attn.in_proj_bias.copy_(block.attn.qkv.bias)
        ref.self_attn.out_proj.weight.copy_(block.attn.proj.weight)
        ref.self_attn.out_proj.bias.copy_(block.attn.proj.bias)
        ref.linear1.weight.copy_(block.mlp.fc1.weight); ref.linear1.bias.copy_(block.mlp.fc1.bias)
        ref.linear2.weight.copy_(block.mlp.fc2.weight); ref.linear2.bias.copy_(block.mlp.fc2.bias)
        for ours, theirs in [(block.norm1, ref.norm1), (block.norm2, ref.norm2)]:
            theirs.weight.copy_(torch.randn_like(theirs.weight)); theirs.bias.copy_(torch.randn_like(theirs.bias))
            ours.weight.copy_(theirs.weight); ours.bias.copy_(theirs.bias)
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        ours, attn = block(x, return_attn=True)
        torch.testing.assert_close(ours, ref(x), atol=1e-5, rtol=1e-5)
        # the attention probabilities too, against nn.MultiheadAttention's per-head weights
        _, ref_attn = ref.self_attn(ref.norm1(x), ref.norm1(x), ref.norm1(x), need_weights=True,
                                    average_attn_weights=False)
        torch.testing.assert_close(attn, ref_attn, atol=1e-5, rtol=1e-5)


def test_resample_pos_embed_identity_at_same_grid():
    pe = torch.randn(1, 1 + 49, 8)
    assert torch.equal(resample_pos_embed(pe, 7), pe)


def test_resample_pos_embed_keeps_class_slot_and_a_smooth_field():
    def field(n):  # a smooth function of the patch centres, sampled on an n x n grid
        c = (torch.arange(n) + 0.5) / n
        yy, xx = torch.meshgrid(c, c, indexing="ij")
        f = torch.stack([torch.sin(2 * math.pi * xx * 0.5), torch.cos(math.pi * yy), xx + 2 * yy], dim=-1)
        return f.reshape(1, n * n, 3)

    cls = torch.randn(1, 1, 3)
    out = resample_pos_embed(torch.cat([cls, field(14)], 1), 7)
    assert out.shape == (1, 50, 3)
    assert torch.equal(out[:, :1], cls)
    assert (out[:, 1:] - field(7)).abs().max() < 0.05
    up = resample_pos_embed(torch.cat([cls, field(7)], 1), (14, 14))
    error = (up[:, 1:] - field(14)).reshape(14, 14, 3)
    assert error[1:-1, 1:-1].abs().max() < 0.05  # upsampling cannot know the field beyond the outer centres
    assert error.abs().max() < 0.1


def test_resample_pos_embed_keeps_rows_and_columns_apart():
    rows = torch.arange(4.0).repeat_interleave(6).reshape(1, 24, 1)  # varies along height only, 4 x 6 grid
    out = resample_pos_embed(torch.cat([torch.zeros(1, 1, 1), rows], 1), (8, 3), old_grid=(4, 6))
    grid = out[0, 1:, 0].reshape(8, 3)
    assert torch.allclose(grid, grid[:, :1].expand(8, 3))  # still constant along each row
    assert grid[0, 0] < grid[-1, 0]


@pytest.mark.parametrize("name", ["vit_tiny", "vit_small", "vit_base"])
def test_paper_variants_have_paper_widths(name):
    cfg = ViTConfig(**VARIANTS[name])
    assert (cfg.embed_dim, cfg.depth, cfg.patch_size, cfg.img_size) == (
        {"vit_tiny": 192, "vit_small": 384, "vit_base": 768}[name], 12, 16, 224)
    assert cfg.embed_dim // cfg.num_heads == 64


def test_the_cpu_variants_share_the_token_grid_and_stem_and_differ_in_width_or_depth():
    base = ViTConfig(**VARIANTS["vit_cpu"])
    wide, deep = ViTConfig(**VARIANTS["vit_cpu_wide"]), ViTConfig(**VARIANTS["vit_cpu_deep"])
    for cfg in (wide, deep):
        assert (cfg.patch_size, cfg.stem_chans, cfg.global_pool, cfg.mlp_ratio) == (base.patch_size, base.stem_chans, "max", 4.0)
        assert cfg.embed_dim // cfg.num_heads == base.embed_dim // base.num_heads == 32
    assert (wide.embed_dim, wide.depth) == (2 * base.embed_dim, base.depth)
    assert (deep.embed_dim, deep.depth) == (base.embed_dim, 2 * base.depth)
    x = torch.randn(2, 1, 224, 224)
    for cfg in (base, wide, deep):
        _, _, attentions = VisionTransformer(cfg)(x, return_attn=True)
        assert len(attentions) == cfg.depth and attentions[0].shape == (2, cfg.num_heads, 50, 50)  # 7 x 7 tokens + class
