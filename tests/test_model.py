"""The HiVG model: parity with the authors' fixtures, bridge variants, LoRA merge, Hi LoRA stages."""
import copy

import pytest
import torch

from datasets.tokens import tokenize
from models.config import select_text_layers
from models.flags import default_config
from models.hivg import HiVG, patch_padding_mask
from models.random_init import dct_basis, init_dct_patch_embedding
from models.lora import merge_lora, merge_lora_state_dict
from tests.conftest import FIXTURES
from utils import parity

FIXTURE_DIRS = sorted(p for p in FIXTURES.iterdir() if (p / "config.json").is_file())


def tiny_model(**changes):
    """The tiny model with every head, at 64 px, built from its config (`changes` by field name)."""
    values = dict(image_size=64, fusion_ffn=64, outputs=["box", "contrastive", "token_map", "seg_map"])
    return HiVG(default_config("tiny", **{**values, **changes}))


def batch(B=3, S=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, S, S, generator=g)
    mask = torch.zeros(B, S, S, dtype=torch.int32)
    mask[0, :, 40:] = 1
    mask[1, 48:, :] = 1
    texts = ["the red circle", "a small blue square on the left of the green star", "cat"][:B]
    return images, mask, texts


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.recorded
@pytest.mark.parametrize("folder", FIXTURE_DIRS, ids=lambda p: p.name)
def test_parity_with_official_fixture(folder, capsys):
    assert parity.check_folder(folder), capsys.readouterr().out


def test_parity_detects_a_wrong_model(monkeypatch, capsys):
    """The parity check can fail: zeroing the LoRA updates (an effect of ~5e-3) must be caught."""
    build = parity.build_from_fixture

    def broken(folder, mode):
        model = build(folder, mode)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.zero_()
        return model

    monkeypatch.setattr(parity, "build_from_fixture", broken)
    assert not parity.check_folder(FIXTURE_DIRS[0])
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.recorded
def test_per_sample_bridge_equals_running_each_sample_alone():
    model = tiny_model(hi_lora_stage=1).eval()
    randomize_lora(model)
    images, mask, texts = batch()
    ids = tokenize(texts, model.context_length)
    with torch.no_grad():
        together = model(images, mask, ids)
        alone = [model(images[i:i + 1], mask[i:i + 1], ids[i:i + 1]) for i in range(3)]
    for key in ("pred_box", "token_map", "seg_map"):
        torch.testing.assert_close(together[key], torch.cat([a[key] for a in alone]), rtol=1e-5, atol=1e-5)
    official = copy.deepcopy(model)
    for bridge in official.bridges.values():
        bridge.bridge_attention = "official"
    with torch.no_grad():
        mixed = official(images, mask, ids)
    assert (mixed["pred_box"] - together["pred_box"]).abs().max() > 1e-6, "official mode must mix the batch"


@pytest.mark.recorded
@pytest.mark.parametrize("mode", ["paper", "official"])
def test_merged_lora_matches_unmerged(mode):
    model = tiny_model(hi_lora_stage=3, hi_lora_mode=mode).eval()
    randomize_lora(model)
    images, mask, texts = batch()
    ids = tokenize(texts, model.context_length)
    with torch.no_grad():
        before = model(images, mask, ids)
        assert merge_lora(model) > 0
        assert not any("lora" in n for n in model.state_dict())
        after = model(images, mask, ids)
    for key, value in before.items():
        assert (value - after[key]).abs().max() <= 1e-5, key


@pytest.mark.recorded
def test_merge_lora_state_dict_equals_module_merge():
    model = tiny_model(hi_lora_stage=2).eval()
    randomize_lora(model)
    merged_sd = merge_lora_state_dict(model.state_dict(), alpha=model.config.lora_alpha)
    merge_lora(model)
    reference = model.state_dict()
    assert set(merged_sd) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(merged_sd[key], value, rtol=0, atol=1e-6)


def _vision_lora_layers(model, trainable_only=True):
    layers = set()
    for name, p in model.named_parameters():
        if name.startswith("clip.visual.transformer.resblocks") and "lora" in name and \
                (p.requires_grad or not trainable_only):
            layers.add(int(name.split(".")[4]))
    return sorted(layers)


@pytest.mark.parametrize("stage,layers", [(0, []), (1, [0, 1]), (2, [0, 1, 2, 3]), (3, [0, 1, 2, 3, 4, 5])])
def test_paper_stages_train_their_groups_only(stage, layers):
    model = tiny_model(hi_lora_stage=stage)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert _vision_lora_layers(model) == layers
    assert _vision_lora_layers(model, trainable_only=False) == layers  # earlier stages are merged
    clip_trainable = [n for n in trainable if n.startswith("clip.")]
    assert all("lora" in n for n in clip_trainable)
    assert not any(n.startswith("clip.transformer") for n in trainable), "text tower stays frozen"
    for prefix in ("bridges.", "fusion.", "box_head.", "visual_proj_multi.", "text_proj.", "reg_token",
                   "pos_embed", "token_align.", "seg_head."):
        assert any(n.startswith(prefix) for n in trainable), prefix
    assert not model.text_tower_trains()


@pytest.mark.parametrize("stage,vision_layers", [(0, []), (1, [0, 1, 2, 3, 4]), (2, [0, 1, 2, 3, 4, 5]),
                                                 (3, [0, 1, 2, 3, 4, 5])])
def test_official_stages(stage, vision_layers):
    model = tiny_model(hi_lora_stage=stage, hi_lora_mode="official")
    assert _vision_lora_layers(model) == vision_layers
    assert _vision_lora_layers(model, trainable_only=False) == list(range(6))
    text_lora = [p.requires_grad for n, p in model.named_parameters()
                 if n.startswith("clip.transformer") and "lora" in n]
    assert text_lora and all(t == (stage >= 1) for t in text_lora)
    assert model.text_tower_trains() == (stage >= 1)
    bridge = [p.requires_grad for n, p in model.named_parameters() if n.startswith("bridges.")]
    assert all(bridge) and any("lora" in n for n, _ in model.bridges.named_parameters())


def test_text_tower_runs_without_autograd_when_frozen():
    model = tiny_model()
    images, mask, texts = batch(2)
    seen = []
    model.clip.ln_final.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    out = model(images, mask, tokenize(texts, model.context_length))
    assert seen == [False]
    out["pred_box"].sum().backward()
    assert model.bridges["1"].adaptive_weights[0].grad is not None


def test_outputs_are_computed_only_when_asked():
    model = tiny_model().eval()
    images, mask, texts = batch(2)
    calls = []
    model.seg_head.register_forward_hook(lambda *a: calls.append("seg"))
    model.token_align.register_forward_hook(lambda *a: calls.append("tok"))
    out = model(images, mask, tokenize(texts, model.context_length), outputs=["box"])
    assert set(out) == {"pred_box"} and calls == []
    out = model(images, mask, tokenize(texts, model.context_length))
    assert set(out) == {"pred_box", "logits_per_text", "token_map", "seg_map"}
    assert out["seg_map"].shape == (2, 1, 64, 64) and out["token_map"].shape == (2, 64)


def test_mixup_variant_and_refusals():
    model = tiny_model(mixup=True, adaptive_weights=False)
    assert model.mixup_text_proj is not None and model.bridges["1"].adaptive_weights is None
    images, mask, texts = batch(2)
    assert model(images, mask, tokenize(texts, model.context_length))["pred_box"].shape == (2, 4)
    with pytest.raises(ValueError, match="--enable_adaptive_weights cannot be combined"):
        tiny_model(mixup=True, adaptive_weights=True)


def test_text_layers_per_dataset():
    assert select_text_layers("unc", 12) == [11]
    assert select_text_layers("unc+", 12) == [5, 11]
    assert select_text_layers("referit", 12) == [5, 11]
    assert select_text_layers("gref_umd", 12) == list(range(12))
    assert select_text_layers("flickr", 12) == [11]


@pytest.mark.recorded
def test_patch_mask_rounds_like_the_official_int32_path():
    folder = FIXTURES / "hivg_tiny_unc_stage1"  # the fixture that records intermediates
    inputs = torch.load(folder / "inputs.pth", weights_only=True)
    expected = torch.load(folder / "outputs.pth", weights_only=True)["collate_int32_mask"]["intermediates"]
    grid = int(expected["visu_mask"].shape[1] ** 0.5)
    ours = patch_padding_mask(inputs["img_mask_int32"], (grid, grid))
    assert torch.equal(ours, expected["visu_mask"])
    assert ours.any() and not ours.all()


def test_position_embedding_interpolates_to_other_image_sizes():
    model = tiny_model(image_size=96).eval()
    images, mask, texts = batch(2, S=96)
    out = model(images, mask, tokenize(texts, model.context_length))
    assert out["token_map"].shape == (2, 144)


def test_dct_basis_is_orthonormal_and_starts_at_the_lowest_frequencies():
    basis = dct_basis(8)
    flat = basis.reshape(64, 64)
    torch.testing.assert_close(flat @ flat.T, torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(basis[0], torch.full((8, 8), 1 / 8, dtype=torch.float64))   # DC first
    assert torch.equal(basis[1], basis[1, :1].expand(8, 8)) or torch.equal(basis[1], basis[1, :, :1].expand(8, 8))


def test_dct_patch_init_refuses_a_width_beyond_the_patch_frequencies():
    visual = torch.nn.Module()
    visual.conv1 = torch.nn.Conv2d(3, 192, 8, 8, bias=False)          # 72 luminance rows > 64 frequencies
    with pytest.raises(ValueError, match="72 frequencies .* a width of at most 172 "):
        init_dct_patch_embedding(visual)


@pytest.mark.recorded
def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = tiny_model(hi_lora_stage=1, fusion_dropout=0)
    randomize_lora(plain)
    ckpt = copy.deepcopy(plain)
    ckpt.grad_checkpointing = True
    images, mask, texts = batch()
    grads = []
    for model in (plain, ckpt):
        model.train()
        for m in model.modules():  # LoRA dropout off: both runs must see the same function
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        out = model(images, mask, tokenize(texts, model.context_length))
        (out["pred_box"].sum() + out["seg_map"].mean() + out["logits_per_text"].sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6)


def test_backward_reaches_exactly_the_trainable_parameters():
    model = tiny_model(hi_lora_stage=2).train()
    images, mask, texts = batch()
    out = model(images, mask, tokenize(texts, model.context_length))
    (out["pred_box"].sum() + out["token_map"].mean() + out["seg_map"].mean()
     + out["logits_per_text"].sum()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable


@pytest.mark.recorded
def test_eager_reference_attention_matches_sdpa():
    from models.attention import eager_attention
    model = tiny_model(hi_lora_stage=1).eval()
    randomize_lora(model)
    images, mask, texts = batch()
    ids = tokenize(texts, model.context_length)
    with torch.no_grad():
        fast = model(images, mask, ids)
        with eager_attention():
            plain = model(images, mask, ids)
    for key, value in fast.items():
        torch.testing.assert_close(plain[key], value, rtol=1e-5, atol=1e-5)


def test_reg_attention_is_a_distribution_over_patches_and_only_on_request():
    model = tiny_model().eval()
    images, mask, texts = batch()
    ids = tokenize(texts, model.context_length)
    with torch.no_grad():
        out = model(images, mask, ids, outputs=["box", "reg_attention"])
        plain = model(images, mask, ids, outputs=["box"])
    attn = out["reg_attention"]
    assert attn.shape == (3, model.num_patches) and (attn >= 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(3))
    assert "reg_attention" not in plain
    torch.testing.assert_close(out["pred_box"], plain["pred_box"])
    # padded patches get no attention (sample 0 has its right 24 columns padded)
    grid = attn[0].view(*model.grid)
    assert grid[:, -2:].sum() == 0


def test_cpu_dropout_mask_distribution_scale_and_gradient():
    from models.dropout import Dropout
    drop = Dropout(0.25)
    x = torch.ones(400, 500, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01                  # 200k draws: std 0.001
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.75))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())                         # d(x * mask)/dx = mask
    assert torch.equal(drop.eval()(x), x)
    assert repr(drop) == repr(torch.nn.Dropout(0.25))


def test_attention_dropout_on_cpu_drops_probabilities_then_averages_values():
    from models.attention import attend
    from models.dropout import keep_mask
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    keep = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    keep[1, ..., -2:] = False
    torch.manual_seed(7)
    out = attend(q, k, v, keep, dropout_p=0.3)
    torch.manual_seed(7)
    probs = (q @ k.transpose(-2, -1) / 2).masked_fill(~keep, float("-inf")).softmax(-1)
    mask, scale = keep_mask(probs.shape, 0.3)
    assert scale == pytest.approx(1 / 0.7, rel=1e-9)
    torch.testing.assert_close(out, (probs * mask * scale) @ v)
    torch.testing.assert_close(attend(q, k, v, keep), probs @ v)           # no dropout: SDPA, same function


def test_quick_gelu_gradient_matches_autograd():
    from models.activations import quick_gelu
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(quick_gelu, (x,))
    y = x.detach().clone().requires_grad_()
    (y * torch.sigmoid(1.702 * y)).sum().backward()
    quick_gelu(x).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_seg_head_equals_the_conv_chain_it_factorises():
    from models.heads import SegHead
    torch.manual_seed(3)
    head = SegHead(16).double()
    patches = torch.randn(2, 12, 16, dtype=torch.float64)
    eot = torch.nn.functional.normalize(torch.randn(2, 16, dtype=torch.float64), dim=-1)
    feats = head.convs(patches.transpose(1, 2).reshape(2, 16, 3, 4))
    expected = torch.einsum("bdhw,bd->bhw", feats, eot)[:, None]
    torch.testing.assert_close(head(patches, (3, 4), eot), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stage", [0, 3])
def test_bf16_autocast_training_step_runs_and_stays_close(stage):
    from utils.losses import GroundingCriterion
    model = tiny_model(hi_lora_stage=stage, fusion_dropout=0).eval()
    randomize_lora(model)
    images, mask, texts = batch()
    ids = tokenize(texts, model.context_length)
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.3]] * 3)
    obj = torch.zeros(3, 64, 64)
    obj[:, 20:40, 20:40] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, mask, ids)
        loss = sum(GroundingCriterion(model.outputs)(out, {"boxes": boxes, "obj_masks": obj}).values())
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        fp32 = model(images, mask, ids)["pred_box"]
    assert (out["pred_box"].float() - fp32).abs().max() < 0.05
