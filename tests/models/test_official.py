"""Official MSFlow checkpoints load into the project's model and compute the same thing.

The parallel flows of the "official" checkpoint are real FrEIA SequenceINNs of
AllInOneBlocks built as the official code built them; the fusion state dict is a project
FusionFlow's weights under the official GraphINN key names, with the three permutation
modules shuffled (their order is not stable in official checkpoints)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from models.backbones import build_backbone
from models.msflow import MSFlow, MSFlowConfig
from models.official import (
    OfficialCheckpointError,
    convert_official_checkpoint,
    import_official_run,
    load_official_checkpoint,
)
from official_subnet import SubnetConvLN

Ff = pytest.importorskip("FrEIA.framework")
Fm = pytest.importorskip("FrEIA.modules")

CONFIG = MSFlowConfig(input_size=64)
COND = CONFIG.cond_channels
# Level l of the model is stored at fusion module_list.SHUFFLE[l] (module 3 is the coupling).
SHUFFLE = (2, 0, 1)


def official_parallel_flow(channels: int, n_blocks: int) -> "Ff.SequenceINN":
    inn = Ff.SequenceINN(channels, 1, 1)
    for _ in range(n_blocks):
        inn.append(
            Fm.AllInOneBlock, cond=0, cond_shape=(COND, 1, 1), subnet_constructor=SubnetConvLN,
            affine_clamping=1.9, global_affine_type="SOFTPLUS",
        )
    with torch.no_grad():  # trained-looking, non-trivial weights
        for name, p in inn.named_parameters():
            if name.endswith(("global_scale",)):
                p.copy_(8.0 + 3.0 * torch.randn_like(p))
            elif name.endswith("global_offset"):
                p.copy_(0.5 * torch.randn_like(p))
            elif p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    return inn.eval()


def official_fusion_state(source: MSFlow) -> dict[str, torch.Tensor]:
    sd = source.fusion_flow.state_dict()
    out = {}
    for level, idx in enumerate(SHUFFLE):
        out[f"module_list.{idx}.perm"] = sd[f"perm_{level}"].clone()
        out[f"module_list.{idx}.perm_inv"] = sd[f"perm_inv_{level}"].clone()
    for k, v in sd.items():
        if k.startswith("coupling."):
            out["module_list.3." + k.removeprefix("coupling.")] = v.clone()
    return out


def to_index_form(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The int64 index-vector form of ``w_perm`` / ``w_perm_inv`` (other FrEIA releases)."""
    out = {}
    for k, v in sd.items():
        if k.endswith(("w_perm", "w_perm_inv")):
            c = v.shape[0]
            v = v.view(c, c).argmax(1).to(torch.int64)
        out[k] = v
    return out


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def official(backbone):
    """(checkpoint dict, FrEIA parallel flows, source project model for the fusion flow)."""
    np.random.seed(10)
    torch.manual_seed(10)
    inns = [official_parallel_flow(c, n) for c, n in zip(CONFIG.channels, CONFIG.parallel_blocks)]
    torch.manual_seed(11)
    source = MSFlow(CONFIG, backbone=backbone).eval()
    with torch.no_grad():
        for p in source.fusion_flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ckpt = {
        "epoch": 17,
        "fusion_flow": official_fusion_state(source),
        "parallel_flows": [inn.state_dict() for inn in inns],
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 1]}]},
    }
    assert ckpt["parallel_flows"][0]["module_list.0.w_perm"].shape == (24, 24, 1, 1)  # FrEIA 0.2 one-hot
    return ckpt, inns, source


def fresh_model(backbone, seed: int = 99) -> MSFlow:
    torch.manual_seed(seed)
    return MSFlow(CONFIG, backbone=backbone).eval()


def random_features(batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(batch, c, n, n, generator=g) for c, n in zip(CONFIG.channels, CONFIG.level_sizes)]


def reference(official, feats):
    """Latents and log-det of the official computation: FrEIA parallel flows + fusion flow."""
    _, inns, source = official
    conds = source.conditions(feats[0].shape[0])
    outs, logdet = [], 0.0
    with torch.no_grad():
        for inn, f, c in zip(inns, feats, conds):
            z, ld = inn(f, c=[c])
            outs.append(z)
            logdet = logdet + ld
        zs, fld = source.fusion_flow(outs)
    return outs, zs, logdet + fld


def assert_reproduces(model: MSFlow, official) -> None:
    feats = random_features()
    par_ref, zs_ref, ld_ref = reference(official, feats)
    conds = model.conditions(2)
    with torch.no_grad():
        for l, (flow, f, c) in enumerate(zip(model.parallel_flows, feats, conds)):
            z, ld = flow(f, c)
            _, inns, _ = official
            _, ref_ld = inns[l](f, c=[c])
            assert torch.allclose(z, par_ref[l], atol=1e-5, rtol=1e-5), f"level {l} latents"
            assert torch.allclose(ld, ref_ld, atol=1e-5, rtol=1e-5), f"level {l} log-det"
        zs, ld = model.flow(feats)
    for l, (z, r) in enumerate(zip(zs, zs_ref)):
        assert torch.allclose(z, r, atol=1e-5, rtol=1e-5), f"fused level {l}"
    assert torch.allclose(ld, ld_ref, atol=1e-3, rtol=1e-5)


# --------------------------------------------------------------------------- loading


def test_load_reproduces_freia_and_source_model(official, backbone):
    ckpt, inns, source = official
    model = fresh_model(backbone)
    feats = random_features()
    _, zs_ref, _ = reference(official, feats)
    with torch.no_grad():
        before, _ = model.flow(feats)
    assert not torch.allclose(before[0], zs_ref[0], atol=1e-3)  # a fresh model really differs

    epoch = load_official_checkpoint(model, ckpt)
    assert epoch == 17
    assert_reproduces(model, official)
    for l in range(3):  # the shuffled fusion permutations went to the right levels
        assert torch.equal(getattr(model.fusion_flow, f"perm_{l}"), getattr(source.fusion_flow, f"perm_{l}"))

    # End to end from pixels: same scores and maps as the official computation.
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(images)
        _, zs_ref, _ = reference(official, source.features(images))
        ref = source.postprocess(zs_ref)
    for key in ("image_score_log", "anomaly_map", "pixel_map"):
        assert torch.allclose(out[key], ref[key], atol=1e-4, rtol=1e-5), key


def test_load_int64_index_permutations(official, backbone):
    ckpt, _, _ = official
    ckpt = dict(ckpt, parallel_flows=[to_index_form(sd) for sd in ckpt["parallel_flows"]])
    assert ckpt["parallel_flows"][2]["module_list.7.w_perm"].dtype == torch.int64
    model = fresh_model(backbone, seed=7)
    assert load_official_checkpoint(model, ckpt) == 17
    assert_reproduces(model, official)


def test_load_from_file_and_data_parallel_prefix(official, backbone, tmp_path):
    ckpt, _, _ = official
    ckpt = dict(ckpt, parallel_flows=list(ckpt["parallel_flows"]))
    ckpt["parallel_flows"][1] = {"module." + k: v for k, v in ckpt["parallel_flows"][1].items()}
    path = tmp_path / "official.pt"
    torch.save(ckpt, path)
    model = fresh_model(backbone, seed=8)
    assert load_official_checkpoint(model, path) == 17
    assert_reproduces(model, official)


def test_import_official_run_writes_project_run(official, backbone, tmp_path):
    ckpt, _, _ = official
    out = import_official_run(ckpt, tmp_path / "run", CONFIG)
    assert out == tmp_path / "run"
    saved = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert set(saved) == {"config", "flows", "epoch", "source"}
    assert saved["source"] == "official" and saved["epoch"] == 17
    assert MSFlowConfig.model_validate(saved["config"]) == CONFIG
    model = fresh_model(backbone, seed=9)
    expected_keys = {k for k in model.state_dict() if not k.startswith("backbone.")}
    assert set(saved["flows"]) == expected_keys
    assert (out / "config.json").read_text() == CONFIG.model_dump_json(indent=2)
    assert MSFlowConfig.model_validate(json.loads((out / "config.json").read_text())) == CONFIG
    missing, unexpected = model.load_state_dict(saved["flows"], strict=False)
    assert not unexpected and all(k.startswith("backbone.") for k in missing)
    assert_reproduces(model, official)


# --------------------------------------------------------------------------- refusals


def _copy(ckpt):
    return dict(ckpt, parallel_flows=[dict(sd) for sd in ckpt["parallel_flows"]], fusion_flow=dict(ckpt["fusion_flow"]))


def _assert_refused(backbone, ckpt, *fragments):
    model = fresh_model(backbone, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(OfficialCheckpointError) as err:
        load_official_checkpoint(model, ckpt)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused checkpoint changed the model"
    return str(err.value)


def test_wrong_channel_count_refused(official, backbone):
    ckpt = _copy(official[0])
    np.random.seed(0)
    ckpt["parallel_flows"][0] = official_parallel_flow(32, 2).state_dict()  # e.g. another backbone
    _assert_refused(backbone, ckpt, "parallel_flows[0].module_list.0.global_scale", "32", "24")


def test_wrong_block_count_refused(official, backbone):
    ckpt = _copy(official[0])
    ckpt["parallel_flows"][1] = {k: v for k, v in ckpt["parallel_flows"][1].items() if not k.startswith("module_list.4.")}
    _assert_refused(backbone, ckpt, "parallel_flows[1]", "blocks")


@pytest.mark.parametrize(
    ("part", "key"),
    [
        (1, "module_list.3.subnet.ln.bias"),
        (2, "module_list.0.w_perm_inv"),
        ("fusion_flow", "module_list.3.subnet_2.conv_t.1.weight"),
        ("fusion_flow", "module_list.3.subnet_1.cross_convs.norm.weight"),
    ],
)
def test_missing_key_refused(official, backbone, part, key):
    ckpt = _copy(official[0])
    sd = ckpt["fusion_flow"] if part == "fusion_flow" else ckpt["parallel_flows"][part]
    del sd[key]
    where = "fusion_flow" if part == "fusion_flow" else f"parallel_flows[{part}]"
    _assert_refused(backbone, ckpt, f"{where}.{key}", "missing")


def test_missing_sections_refused(official, backbone):
    ckpt = _copy(official[0])
    del ckpt["fusion_flow"]
    _assert_refused(backbone, ckpt, "fusion_flow")
    ckpt = _copy(official[0])
    ckpt["parallel_flows"] = ckpt["parallel_flows"][:2]
    _assert_refused(backbone, ckpt, "parallel_flows", "3")


def test_unexpected_key_refused(official, backbone):
    ckpt = _copy(official[0])
    ckpt["fusion_flow"]["module_list.3.subnet_1.scales_s"] = torch.ones(3)
    _assert_refused(backbone, ckpt, "fusion_flow.module_list.3.subnet_1.scales_s", "unexpected")


def test_wrong_shape_refused(official, backbone):
    ckpt = _copy(official[0])
    w = ckpt["fusion_flow"]["module_list.3.subnet_1.conv_s.2.weight"]
    ckpt["fusion_flow"]["module_list.3.subnet_1.conv_s.2.weight"] = w[:, :-1]
    _assert_refused(backbone, ckpt, "fusion_flow.module_list.3.subnet_1.conv_s.2.weight", "shape")


def test_fusion_permutations_matched_by_length(official, backbone):
    # Two permutations of length 24 and none of 40: level 0 is ambiguous.
    ckpt = _copy(official[0])
    fsd = ckpt["fusion_flow"]
    i1, i0 = SHUFFLE[1], SHUFFLE[0]
    fsd[f"module_list.{i1}.perm"] = fsd[f"module_list.{i0}.perm"].clone()
    fsd[f"module_list.{i1}.perm_inv"] = fsd[f"module_list.{i0}.perm_inv"].clone()
    _assert_refused(backbone, ckpt, "length 24", "more than one")
    # A permutation module missing altogether.
    ckpt = _copy(official[0])
    del ckpt["fusion_flow"][f"module_list.{SHUFFLE[2]}.perm"]
    _assert_refused(backbone, ckpt, "perm")


def test_invalid_permutations_refused(official, backbone):
    ckpt = _copy(official[0])
    w = ckpt["parallel_flows"][0]["module_list.1.w_perm"].clone()
    w[0, :, 0, 0] = 1.0  # a row with many ones: not a permutation matrix
    ckpt["parallel_flows"][0]["module_list.1.w_perm"] = w
    _assert_refused(backbone, ckpt, "parallel_flows[0].module_list.1.w_perm", "permutation")

    ckpt = _copy(official[0])
    w = ckpt["parallel_flows"][0]["module_list.1.w_perm_inv"]
    ckpt["parallel_flows"][0]["module_list.1.w_perm_inv"] = w.transpose(0, 1)  # = w_perm, not its inverse
    if not torch.equal(w, w.transpose(0, 1)):
        _assert_refused(backbone, ckpt, "module_list.1.w_perm_inv", "inverse")

    ckpt = _copy(official[0])
    key = f"module_list.{SHUFFLE[1]}.perm"
    p = ckpt["fusion_flow"][key].clone()
    p[0] = p[1]
    ckpt["fusion_flow"][key] = p
    _assert_refused(backbone, ckpt, f"fusion_flow.{key}", "not a permutation")


def test_unreadable_file_refused(tmp_path, backbone):
    model = fresh_model(backbone)
    with pytest.raises(OfficialCheckpointError, match="not found"):
        load_official_checkpoint(model, tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(OfficialCheckpointError):
        load_official_checkpoint(model, bad)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(OfficialCheckpointError, match="dict"):
        load_official_checkpoint(model, tmp_path / "list.pt")


def test_convert_returns_flow_state_without_backbone(official, backbone):
    model = fresh_model(backbone)
    state, epoch = convert_official_checkpoint(model, official[0])
    assert epoch == 17
    assert set(state) == {k for k in model.state_dict() if not k.startswith("backbone.")}
    assert state["parallel_flows.0.blocks.0.perm"].dtype == torch.int64


def test_imported_run_loads_with_project_run_loader(official, tmp_path):
    """The run folder is what the project's own run loader expects."""
    from models.runs import load_model

    out = import_official_run(official[0], tmp_path / "run", CONFIG)
    model, info = load_model(out)
    assert info["source"] == "official" and info["epoch"] == 17
    assert_reproduces(model, official)


def test_import_into_a_folder_of_another_run_removes_that_runs_outputs(official, tmp_path):
    """Left beside the imported checkpoint, the old run's report and holdout were exported as the
    imported model's metrics and calibration normals."""
    from models.runs import RUN_OUTPUTS

    out = tmp_path / "run"
    out.mkdir()
    old = [*RUN_OUTPUTS, "holdout.json", "config.json"]
    for name in old:
        (out / name).write_bytes(b"the previous run's")
    (out / "notes.txt").write_text("not a run output: kept")
    with pytest.warns(UserWarning, match="held another run: removed its last.pt"):
        import_official_run(official[0], out, CONFIG)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "notes.txt"]
    assert MSFlowConfig.model_validate_json((out / "config.json").read_text()) == CONFIG
    assert torch.load(out / "checkpoint.pt", weights_only=True)["source"] == "official"
    with warnings.catch_warnings():  # importing again over an import: nothing else to remove, no warning
        warnings.simplefilter("error")
        import_official_run(official[0], out, CONFIG)
    (out / "report.json").write_text("{}")
    told: list[str] = []
    import_official_run(official[0], out, CONFIG, warn=told.append)
    assert len(told) == 1 and "removed its report.json" in told[0] and not (out / "report.json").exists()
