"""models.attention.Attention: the one attention of the CLIP towers, the bridges and the fusion encoder."""
from types import SimpleNamespace

import open_clip
import pytest
import torch
import torch.nn.functional as F

from models.attention import Attention
from models.backbone import build_clip
from models.configs import load_model_config
from models.lora import add_attention_lora, apply_hi_lora, merge_lora

D, H = 16, 4


def random_attention(seed=0, lora=False):
    torch.manual_seed(seed)
    mha = torch.nn.MultiheadAttention(D, H, batch_first=True)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    attn = Attention.sharing(mha)
    if lora:
        add_attention_lora(attn, rank=32, alpha=16, dropout=0.0)
        with torch.no_grad():
            attn.lora_in.lora_B.normal_(0, 0.1)
            attn.lora_out.lora_B.normal_(0, 0.1)
    return mha, attn.eval()


@pytest.mark.recorded
def test_self_attention_equals_nn_multihead_attention():
    mha, attn = random_attention()
    x = torch.randn(2, 7, D)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)  # nn.MultiheadAttention: True = masked out
    torch.testing.assert_close(attn(x), mha(x, x, x, need_weights=False)[0])
    torch.testing.assert_close(attn(x, causal=True), mha(x, x, x, attn_mask=causal, need_weights=False)[0])
    assert list(attn.state_dict()) == list(mha.state_dict())
    assert all(a is b for a, b in zip(attn.parameters(), mha.parameters()))


def test_query_attention_is_the_head_mean_of_one_row_of_the_probabilities():
    mha, attn = random_attention()
    x = torch.randn(2, 6, D)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, -2:] = True
    _, probs = mha(x, x, x, key_padding_mask=pad, need_weights=True, average_attn_weights=True)
    torch.testing.assert_close(attn.query_attention(x, ~pad[:, None, None, :], index=2), probs[:, 2])


def _in_projection_rows(monkeypatch, attn):
    """Record the rows of every GEMM on a slice of attn.in_proj_weight."""
    rows, linear = [], F.linear
    start = attn.in_proj_weight.data_ptr()
    end = start + attn.in_proj_weight.numel() * attn.in_proj_weight.element_size()

    def spy(x, weight, bias=None):
        if start <= weight.data_ptr() < end:
            rows.append(weight.shape[0])
        return linear(x, weight, bias)

    monkeypatch.setattr(F, "linear", spy)
    return rows


@pytest.mark.recorded
@pytest.mark.parametrize("lora", [False, True])
def test_shared_inputs_share_one_gemm_and_compute_the_same(monkeypatch, lora):
    _, attn = random_attention(lora=lora)
    x, kv = torch.randn(2, 5, D), torch.randn(2, 3, D)
    separate = {"self": attn(x, x.clone(), x.clone()), "fusion": attn(x, x.clone(), kv[:, :1].expand(2, 5, D)),
                "bridge": attn(x, kv, kv.clone())}
    rows = _in_projection_rows(monkeypatch, attn)
    shared = {"self": attn(x), "fusion": attn(x, value=kv[:, :1].expand(2, 5, D)), "bridge": attn(x, kv)}
    assert rows == [3 * D, 2 * D, D, D, 2 * D]
    for name, out in shared.items():
        torch.testing.assert_close(out, separate[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_q_k_v_adapters_draw_the_dropout_masks_of_their_mode(mode):
    """Official mode, as peft's separate adapters in the authors' model: with equal q, k and v adapters the
    three updates differ in training (one mask each); paper mode shares one mask (one GEMM), so they agree.
    Both agree in eval mode."""
    blocks = [SimpleNamespace(attn=random_attention(seed)[1]) for seed in range(3)]
    apply_hi_lora(blocks, [], [], stage=3, mode=mode, rank=32, alpha=16, dropout=0.1)
    lora = blocks[0].attn.lora_in
    with torch.no_grad():
        lora.lora_A.copy_(lora.lora_A[:lora.rank].repeat(3, 1))
        lora.lora_B.copy_(torch.randn(1, D, lora.rank).expand(3, -1, -1))
    x = torch.randn(2, 50, D)
    q, k, v = lora.train()(x).chunk(3, dim=-1)
    if mode == "official":
        assert not torch.equal(q, k) and not torch.equal(k, v) and not torch.equal(q, v)
    else:
        assert not torch.equal(q, lora.eval()(x).chunk(3, dim=-1)[0])   # dropout did act
        assert torch.equal(q, k) and torch.equal(k, v)
    q, k, v = lora.eval()(x).chunk(3, dim=-1)
    assert torch.equal(q, k) and torch.equal(k, v)


@pytest.mark.recorded
def test_adapters_are_declared_children_with_the_checkpoint_names():
    _, attn = random_attention()
    assert not attn.has_lora and attn.lora_in is None and attn.lora_out is None
    plain = set(attn.state_dict())
    x = torch.randn(2, 5, D)
    _, adapted = random_attention(lora=True)
    assert adapted.has_lora
    assert set(adapted.state_dict()) - plain == {f"lora_{io}.lora_{ab}" for io in ("in", "out") for ab in "AB"}
    before = adapted(x)
    assert merge_lora(adapted) == 1
    assert not adapted.has_lora and set(adapted.state_dict()) == plain
    torch.testing.assert_close(adapted(x), before, rtol=1e-5, atol=1e-5)


def test_clip_blocks_hold_open_clips_parameters_under_the_same_names():
    cfg = load_model_config("tiny")["clip"]
    torch.manual_seed(0)
    reference, next_draw = open_clip.model.CLIP(**cfg).state_dict(), torch.rand(1)
    torch.manual_seed(0)
    clip = build_clip(cfg)
    assert torch.equal(torch.rand(1), next_draw)  # no extra random draws: seeded inits stay as they were
    blocks = list(clip.visual.transformer.resblocks) + list(clip.transformer.resblocks)
    assert all(isinstance(b.attn, Attention) for b in blocks)
    state = clip.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], reference[k]) for k in state)
