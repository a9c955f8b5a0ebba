"""The flows against the spec (MSFLOW_SPEC.md sections 2-5), FrEIA's AllInOneBlock, and
autograd Jacobians; MSFlow's post-processing on hand-made latents."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.flows import CouplingBlock, FusionFlow, ParallelFlow, positional_encoding_2d
from models.msflow import MSFlow, MSFlowConfig
from official_subnet import SubnetConvLN

Ff = pytest.importorskip("FrEIA.framework")
Fm = pytest.importorskip("FrEIA.modules")


# --------------------------------------------------------------------------- helpers


def _randomize_(module: nn.Module, scale: float = 0.3) -> None:
    """Non-trivial values everywhere (default init leaves LayerNorm at 1/0)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


def _set_global_affine_(block, channels: int) -> None:
    """Random global scale/offset, one channel in softplus' linear region (0.5*gs > 20)."""
    with torch.no_grad():
        gs = 8.0 + 4.0 * torch.randn(1, channels, 1, 1)
        gs[0, 0] = 45.0
        block.global_scale.copy_(gs)
        block.global_offset.copy_(torch.randn(1, channels, 1, 1))


def _jacobian_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of a map R^n -> R^n (flattened), in float64."""
    jac = torch.autograd.functional.jacobian(fn, x)
    n = x.numel()
    sign, logabs = torch.linalg.slogdet(jac.reshape(n, n))
    assert sign != 0
    return logabs


# --------------------------------------------------------------------------- positional condition


def test_positional_encoding_matches_formula_element_by_element():
    D, H, W = 8, 3, 5
    pe = positional_encoding_2d(D, H, W)
    assert pe.shape == (D, H, W)
    d = D // 2
    expected = torch.zeros(D, H, W, dtype=torch.float64)
    for k in range(d // 2):
        f = math.exp(-(2 * k) * math.log(10000.0) / d)
        for y in range(H):
            for x in range(W):
                expected[2 * k, y, x] = math.sin(x * f)
                expected[2 * k + 1, y, x] = math.cos(x * f)
                expected[d + 2 * k, y, x] = math.sin(y * f)
                expected[d + 2 * k + 1, y, x] = math.cos(y * f)
    assert torch.allclose(pe.double(), expected, atol=1e-6)
    # First half varies along x only, second half along y only.
    for c in range(d):
        assert torch.all(pe[c] == pe[c, :1, :]), c
        if c < 2:  # k=0: f=1, so x matters
            assert not torch.all(pe[c] == pe[c, :, :1])
    for c in range(d, D):
        assert torch.all(pe[c] == pe[c, :, :1]), c
        if c < d + 2:
            assert not torch.all(pe[c] == pe[c, :1, :])


def test_positional_encoding_rejects_bad_channel_count():
    with pytest.raises(ValueError):
        positional_encoding_2d(6, 2, 2)


# --------------------------------------------------------------------------- coupling block vs FrEIA


@pytest.mark.parametrize("channels", [6, 5])
def test_coupling_block_equals_freia_all_in_one_block(channels):
    torch.manual_seed(0)
    np.random.seed(0)
    cond_ch, H, W = 8, 4, 3
    ref = Fm.AllInOneBlock(
        [(channels, H, W)], dims_c=[(cond_ch, H, W)], subnet_constructor=SubnetConvLN,
        affine_clamping=1.9, global_affine_type="SOFTPLUS",
    )
    _randomize_(ref.subnet)
    _set_global_affine_(ref, channels)

    ours = CouplingBlock(channels, cond_ch, clamp=1.9)
    with torch.no_grad():
        for name in ("conv1.weight", "conv1.bias", "ln.weight", "ln.bias", "conv2.weight", "conv2.bias"):
            ours.subnet.get_parameter(name).copy_(ref.subnet.get_parameter(name))
        ours.global_scale.copy_(ref.global_scale)
        ours.global_offset.copy_(ref.global_offset)
        perm = ref.w_perm.view(channels, channels).argmax(1)
        assert not torch.equal(perm, torch.arange(channels))  # a non-trivial permutation
        ours.perm.copy_(perm)
        ours.perm_inv.copy_(torch.argsort(perm))

    x = 2.0 * torch.randn(3, channels, H, W)
    c = torch.randn(3, cond_ch, H, W)
    with torch.no_grad():
        (ref_out,), ref_ld = ref((x,), c=[c])
        out, ld = ours(x, c)
        (ref_inv,), ref_ild = ref((ref_out,), c=[c], rev=True)
        inv, ild = ours.inverse(out, c)
    assert out.shape == ref_out.shape and ld.shape == (3,)
    assert torch.allclose(out, ref_out, atol=1e-5)
    assert torch.allclose(ld, ref_ld, atol=1e-5)
    assert torch.allclose(inv, ref_inv, atol=1e-5)
    assert torch.allclose(ild, ref_ild, atol=1e-5)


# --------------------------------------------------------------------------- invertibility and log-det


def _assert_inverts(flow: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``flow``'s inverse brings ``x`` back and its log-det cancels the forward one (float64):
    the forward log-det."""
    with torch.no_grad():
        z, ld = flow(x, c)
        x_back, ild = flow.inverse(z, c)
    assert torch.allclose(x_back, x, atol=1e-10)
    assert torch.allclose(ld + ild, torch.zeros_like(ld), atol=1e-10)
    return ld


def test_coupling_block_inverse_and_jacobian():
    torch.manual_seed(1)
    C, Cc, H, W = 4, 3, 2, 2
    block = CouplingBlock(C, Cc).double()
    _randomize_(block.subnet, 0.5)
    _set_global_affine_(block, C)
    x = torch.randn(1, C, H, W, dtype=torch.float64)
    c = torch.randn(1, Cc, H, W, dtype=torch.float64)
    ld = _assert_inverts(block, x, c)
    ref = _jacobian_logdet(lambda v: block(v, c)[0], x)
    assert torch.allclose(ld[0], ref, atol=1e-8)
    # Same log-det per sample in a batch (log-det is per sample, shape [B]).
    xb = torch.randn(3, C, H, W, dtype=torch.float64)
    with torch.no_grad():
        _, ldb = block(xb, c.expand(3, -1, -1, -1))
    for i in range(3):
        ref_i = _jacobian_logdet(lambda v: block(v, c)[0], xb[i : i + 1])
        assert torch.allclose(ldb[i], ref_i, atol=1e-8)


def test_parallel_flow_inverse_and_jacobian():
    torch.manual_seed(2)
    C, Cc, H, W = 5, 4, 2, 2
    flow = ParallelFlow(C, Cc, n_blocks=3).double()
    for block in flow.blocks:
        _randomize_(block.subnet, 0.5)
        _set_global_affine_(block, C)
    x = torch.randn(2, C, H, W, dtype=torch.float64)
    c = torch.randn(2, Cc, H, W, dtype=torch.float64)
    ld = _assert_inverts(flow, x, c)
    assert ld.shape == (2,)
    for i in range(2):
        ref = _jacobian_logdet(lambda v: flow(v, c[i : i + 1])[0], x[i : i + 1])
        assert torch.allclose(ld[i], ref, atol=1e-8)


def _fusion_and_inputs(batch: int = 1):
    torch.manual_seed(3)
    channels, sizes = [4, 4, 6], [4, 2, 1]
    fusion = FusionFlow(channels).double()
    _randomize_(fusion, 0.5)
    xs = [torch.randn(batch, c, s, s, dtype=torch.float64) for c, s in zip(channels, sizes)]
    return fusion, xs, channels, sizes


def test_fusion_flow_inverse_and_jacobian():
    fusion, xs, channels, sizes = _fusion_and_inputs()
    with torch.no_grad():
        zs, ld = fusion(xs)
        xs_back, ild = fusion.inverse(zs)
    for x, z, xb in zip(xs, zs, xs_back):
        assert z.shape == x.shape
        assert torch.allclose(xb, x, atol=1e-10)
    assert torch.allclose(ld + ild, torch.zeros_like(ld), atol=1e-10)

    numels = [x[0].numel() for x in xs]

    def fn(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, numels)
        ins = [p.view(1, c, s, s) for p, c, s in zip(parts, channels, sizes)]
        outs, _ = fusion(ins)
        return torch.cat([o.reshape(-1) for o in outs])

    flat = torch.cat([x.reshape(-1) for x in xs])
    ref = _jacobian_logdet(fn, flat)
    assert torch.allclose(ld[0], ref, atol=1e-8)
    # The coupling is not volume preserving here: a vacuous test would give 0.
    assert ref.abs() > 1e-3


def test_fusion_flow_matches_spec_reference():
    """An independent transcription of MSFLOW_SPEC.md section 4 (adaptive pooling, atan clamp)."""
    fusion, xs, channels, sizes = _fusion_and_inputs(batch=2)
    cp = fusion.coupling
    clamp = 1.9

    def log_e(s):
        return clamp * 0.636 * torch.atan(s / clamp)

    def subnet(net, inputs):
        cc = net.cross_convs
        smallest = inputs[-1].shape[-2:]
        m = torch.cat([F.adaptive_avg_pool2d(v, smallest) for v in inputs], 1)
        m = F.conv2d(m, cc.conv1.weight, cc.conv1.bias, padding=1)
        m = F.layer_norm(m.permute(0, 2, 3, 1), (m.shape[1],), cc.norm.weight, cc.norm.bias).permute(0, 3, 1, 2)
        m = F.relu(F.conv2d(F.relu(m), cc.conv2.weight, cc.conv2.bias, padding=1))
        parts = torch.split(m, [v.shape[1] for v in inputs], 1)
        rs = [v + F.interpolate(p, size=v.shape[-2:], mode="bilinear", align_corners=True) for v, p in zip(inputs, parts)]
        return [
            (F.conv2d(r, cs.weight, cs.bias, padding=1), F.conv2d(r, ct.weight, ct.bias, padding=1))
            for r, cs, ct in zip(rs, net.conv_s, net.conv_t)
        ]

    with torch.no_grad():
        perms = [getattr(fusion, f"perm_{i}") for i in range(3)]
        px = [x[:, p] for x, p in zip(xs, perms)]
        x1 = [x[:, : c // 2] for x, c in zip(px, channels)]
        x2 = [x[:, c // 2 :] for x, c in zip(px, channels)]
        st2 = subnet(cp.subnet_2, x2)
        y1 = [torch.exp(log_e(s)) * a + t for a, (s, t) in zip(x1, st2)]
        st1 = subnet(cp.subnet_1, y1)
        y2 = [torch.exp(log_e(s)) * b + t for b, (s, t) in zip(x2, st1)]
        ref_z = [torch.cat([a, b], 1) for a, b in zip(y1, y2)]
        ref_ld = sum(log_e(s1).sum((1, 2, 3)) + log_e(s2).sum((1, 2, 3)) for (s1, _), (s2, _) in zip(st1, st2))
        zs, ld = fusion(xs)
    for z, r in zip(zs, ref_z):
        assert torch.allclose(z, r, atol=1e-10)
    assert torch.allclose(ld, ref_ld, atol=1e-10)


# --------------------------------------------------------------------------- the whole model


@pytest.fixture(scope="module")
def tiny_model() -> MSFlow:
    torch.manual_seed(4)
    return MSFlow(MSFlowConfig(input_size=64, map_sigma=0.0)).eval()  # unsmoothed: maps checkable by hand


def test_msflow_feature_shapes_and_flow_inverse(tiny_model):
    cfg = tiny_model.config
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        feats = tiny_model.features(images)
        assert [f.shape[1] for f in feats] == list(cfg.channels)
        assert [tuple(f.shape[2:]) for f in feats] == [(n, n) for n in cfg.level_sizes]
        zs, ld = tiny_model.flow(feats)
        assert [z.shape for z in zs] == [f.shape for f in feats]
        assert ld.shape == (2,) and torch.isfinite(ld).all()
        back, ild = tiny_model.inverse(zs)
    for f, b in zip(feats, back):
        assert torch.allclose(b, f, atol=1e-4, rtol=1e-4)
    assert torch.allclose(ld + ild, torch.zeros_like(ld), atol=1e-2)
    out = tiny_model(images)
    assert out["image_score"].shape == (2,) and out["anomaly_map"].shape == (2, 64, 64)


def _zero_latents(model: MSFlow, batch: int) -> list[torch.Tensor]:
    return [torch.zeros(batch, c, n, n) for c, n in zip(model.config.channels, model.config.level_sizes)]


def test_postprocess_all_zero_latents(tiny_model):
    out = tiny_model.postprocess(_zero_latents(tiny_model, 2))
    for key in ("image_score", "image_score_log", "absolute_score"):
        assert torch.equal(out[key], torch.zeros(2)), key
    for key in ("anomaly_map", "score_map"):
        assert out[key].shape == (2, 64, 64)
        assert torch.equal(out[key], torch.zeros(2, 64, 64)), key
    # Bilinear upsampling of a constant 1 is 1 only up to float32 rounding.
    assert torch.allclose(out["pixel_map"], torch.zeros(2, 64, 64), atol=1e-6)


def test_postprocess_hot_spot_in_level0(tiny_model):
    zs = _zero_latents(tiny_model, 1)
    n0 = tiny_model.config.level_sizes[0]  # 8 at input 64
    zs[0][0, :, 3, 5] = 3.0  # logp = -0.5 * 9 = -4.5 at that cell
    out = tiny_model.postprocess(zs)
    amap = out["anomaly_map"][0]
    # align_corners=True: cell i of n0 maps to pixel i * (S-1)/(n0-1) = 9 i.
    step = (64 - 1) // (n0 - 1)
    assert torch.isclose(amap.max(), torch.tensor(4.5))
    assert tuple(np.unravel_index(int(amap.argmax()), amap.shape)) == (3 * step, 5 * step)
    assert amap.min() == 0
    pmap = out["pixel_map"][0]
    assert tuple(np.unravel_index(int(pmap.argmax()), pmap.shape)) == (3 * step, 5 * step)
    # Paper score: mean of the top-k of 1 - exp(M - max M), by hand.
    k = tiny_model.config.top_k_pixels
    a = (1.0 - torch.exp(-amap.double())).flatten()
    expected = a.topk(k).values.mean()
    assert torch.isclose(out["image_score"][0].double(), expected, atol=1e-6)
    assert torch.isclose(out["absolute_score"][0], amap.flatten().topk(k).values.mean(), atol=1e-6)
    assert torch.allclose(out["score_map"][0].double(), 1.0 - torch.exp(-amap.double()), atol=1e-6)


def test_served_map_smoothing_leaves_the_paper_outputs_alone(tiny_model):
    from scipy import ndimage

    zs = _zero_latents(tiny_model, 1)
    zs[0][0, :, 3, 5] = 3.0
    zs[1][0] = 0.3 * torch.randn_like(zs[1][0])
    plain = tiny_model.postprocess(zs)
    smoothed_model = MSFlow(tiny_model.config.model_copy(update={"map_sigma": 2.0}), backbone=tiny_model.backbone)
    smoothed_model.load_state_dict(tiny_model.state_dict())
    smooth = smoothed_model.postprocess(zs)
    for key in ("image_score", "image_score_log", "score_map", "pixel_map"):  # the paper's, untouched
        assert torch.equal(smooth[key], plain[key]), key
    # torch "reflect" padding is scipy's "mirror"; taps out to 3 sigma (truncate=3)
    expected = ndimage.gaussian_filter(plain["anomaly_map"][0].double().numpy(), 2.0, mode="mirror", truncate=3.0)
    assert np.allclose(smooth["anomaly_map"][0].numpy(), expected, atol=1e-5)
    k = tiny_model.config.top_k_pixels
    assert torch.isclose(smooth["absolute_score"][0], smooth["anomaly_map"][0].flatten().topk(k).values.mean())
    assert smooth["anomaly_map"].max() < plain["anomaly_map"].max()  # a hot spot is spread, not sharpened


def test_image_score_log_is_consistent_and_ranks_like_image_score(tiny_model):
    torch.manual_seed(5)
    batch = 6
    zs = _zero_latents(tiny_model, batch)
    for i, amp in enumerate([0.3, 0.6, 0.9, 1.2, 1.5, 1.8]):
        zs[0][i, :, 2:5, 2:6] = amp * (1.0 + 0.1 * torch.rand(zs[0].shape[1], 3, 4))
        zs[1][i] = 0.05 * torch.randn_like(zs[1][i])
    out = tiny_model.postprocess(zs)
    s, slog = out["image_score"], out["image_score_log"]
    assert torch.allclose(s, 1.0 - torch.exp(-slog), atol=1e-6)
    assert (s < 1.0).all()
    assert torch.equal(torch.argsort(s), torch.argsort(slog))
    assert torch.equal(torch.argsort(s), torch.arange(batch))

    # Saturated paper score: every image ties at 1.0, the log score still ranks them.
    zs = _zero_latents(tiny_model, 3)
    for i, amp in enumerate([40.0, 50.0, 60.0]):
        zs[0][i] = amp
        zs[0][i, :, 0, 0] = 0.0  # one normal cell: max M stays at 0 there
    out = tiny_model.postprocess(zs)
    assert torch.equal(out["image_score"], torch.ones(3))
    assert torch.equal(torch.argsort(out["image_score_log"]), torch.arange(3))
