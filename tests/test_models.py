import json

import pytest
import torch
from conftest import FIXTURES
from torch.utils.flop_counter import FlopCounterMode

from regdit import RegditError
from regdit.core.models import (
    OFFICIAL_ONLY_ARGUMENTS,
    SiT,
    SiT_models,
    SiTConfig,
    create_model,
    create_sit,
    get_2d_sincos_pos_embed,
)

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4,
            num_classes=10, z_dims=[32], projector_dim=128, encoder_depth=2)


def test_official_checkpoint_reproduces_official_outputs(official_tiny):
    checkpoint, io = official_tiny
    model = create_sit(**io["config"]).eval()
    model.load_state_dict(checkpoint["ema"], strict=True)
    with torch.no_grad():
        out, zs, cls_out = model(io["x"], io["t"], io["y"], cls_token=io["cls_token"])
    torch.testing.assert_close(out, io["out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(zs[0], io["zs"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(cls_out, io["cls_out"], atol=1e-5, rtol=0)
    # optimizer state order
    assert [name for name, _ in model.named_parameters()] == list(checkpoint["model"])


def test_sit_xl2_state_dict_equals_official_list():
    reference = json.loads((FIXTURES / "official_sit_xl2_state_dict.json").read_text())
    with torch.device("meta"):  # shapes only: no 675M-parameter allocation
        model = SiT_models["SiT-XL/2"](z_dims=[768], encoder_depth=8, input_size=32,
                                       num_classes=1000)
    ours = [{"name": k, "shape": list(v.shape)} for k, v in model.state_dict().items()]
    assert ours == reference["parameters"]


def test_sdpa_and_explicit_softmax_attention_agree():
    torch.manual_seed(0)
    config = SiTConfig(**TINY, qk_norm=True)
    fused, explicit = SiT(config), SiT(config, fused_attn=False)
    for p in fused.parameters():  # leave the zero-initialised layers non-zero so attention matters
        torch.nn.init.normal_(p, std=0.1)
    explicit.load_state_dict(fused.state_dict())
    x, t, y, cls = (torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 10]),
                    torch.randn(3, 32))
    for a, b in zip(fused.eval()(x, t, y, cls_token=cls), explicit.eval()(x, t, y, cls_token=cls)):
        torch.testing.assert_close(a if torch.is_tensor(a) else a[0],
                                   b if torch.is_tensor(b) else b[0])


def test_initialisation_is_adaln_zero_and_outputs_start_at_zero():
    model = SiT(SiTConfig(**TINY))
    for block in model.blocks:
        assert block.adaLN_modulation[-1].weight.abs().sum() == 0
    out, zs, cls_out = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]),
                             cls_token=torch.randn(2, 32))
    assert out.abs().max() == 0 and cls_out.abs().max() == 0  # final layers zero-initialised
    assert zs[0].shape == (2, 17, 32)
    assert model.pos_embed[0, 0].abs().sum() == 0 and not model.pos_embed.requires_grad
    w = model.x_embedder.proj.weight.view(64, -1)
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5  # xavier-uniform on the (D, C*p*p) view
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound


def test_pos_embed_matches_mae_formula():
    # rows: cls, (h0,w0), (h0,w1), (h1,w0), (h1,w1)
    emb = get_2d_sincos_pos_embed(8, 2, extra_tokens=1)
    assert emb.shape == (5, 8) and (emb[0] == 0).all()
    # first half of the dims embeds grid[0] = the w coordinate (meshgrid(w, h)), as sin then cos
    omega = 1 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2)
    w_coord = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    expected = torch.cat([torch.sin(w_coord[:, None] * omega), torch.cos(w_coord[:, None] * omega)],
                         dim=1)
    torch.testing.assert_close(torch.from_numpy(emb[1:, :4]), expected)


def test_repa_and_sit_baselines_are_settings_of_the_same_class():
    repa = SiT(SiTConfig(**TINY, use_cls_token=False))
    names = repa.state_dict().keys()
    assert repa.pos_embed.shape == (1, 16, 64)
    assert not any(k.startswith(("cls_projectors2", "wg_norm", "final_layer.linear_cls"))
                   for k in names)
    out, zs, cls_out = repa(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 10]))
    assert out.shape == (2, 4, 8, 8) and zs[0].shape == (2, 16, 32) and cls_out is None

    sit = SiT(SiTConfig(**{**TINY, "z_dims": []}, use_cls_token=False))
    assert not any(k.startswith("projectors") for k in sit.state_dict())
    out, zs, cls_out = sit(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 10]))
    assert zs == [] and cls_out is None


def test_label_dropout_uses_the_null_class_only_in_training():
    model = SiT(SiTConfig(**{**TINY, "class_dropout_prob": 1.0}))
    labels = torch.tensor([1, 2, 3])
    emb = model.y_embedder
    torch.testing.assert_close(emb(labels, train=True), emb.embedding_table.weight[[10, 10, 10]])
    torch.testing.assert_close(emb(labels, train=False), emb.embedding_table.weight[[1, 2, 3]])


def test_model_names_and_errors():
    assert len(SiT_models) == 16  # S, B, L, XL with patch 1, 2, 4, 8
    with torch.device("meta"):
        assert len(create_model("SiT-B/4", z_dims=[768], encoder_depth=4).blocks) == 12
    with pytest.raises(RegditError, match="unknown model 'SiT-XXL/2'"):
        create_model("SiT-XXL/2")
    with pytest.raises(RegditError, match="encoder_depth 13"):
        create_model("SiT-S/2", encoder_depth=13)
    with pytest.raises(ValueError, match="cls_token"):
        SiT(SiTConfig(**TINY))(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]))


def test_config_round_trips_and_drops_only_the_listed_official_arguments():
    config = SiTConfig(**TINY)
    assert SiTConfig.from_dict(config.to_dict()) == config and config.to_dict()["z_dims"] == [32]
    assert SiTConfig(**{**TINY, "depth": 28, "hidden_size": 1152}).label == "SiT-XL/2"
    assert config.label == "SiT-custom/2"
    official = dict(path_type="linear", decoder_hidden_size=64, use_cfg=True, cls_token_dim=32,
                    fused_attn=False)
    assert set(official) - {"fused_attn"} == set(OFFICIAL_ONLY_ARGUMENTS)
    # an official `SiT_models[name](**kwargs)` call
    model = SiT_models["SiT-S/2"](**{**TINY, **official})
    assert model.config == config and not model.blocks[0].attn.fused_attn
    with pytest.raises(TypeError, match="unexpected keyword argument 'encoder_dept'"):
        SiT_models["SiT-S/2"](encoder_dept=4)  # a misspelt keyword is an error
    with pytest.raises(RegditError, match="ckpt.pt: unknown model settings decoder_depth"):
        SiTConfig.from_dict({**TINY, "decoder_depth": 2}, "ckpt.pt")


def test_config_refuses_a_name_key():
    with pytest.raises(RegditError, match="^ckpt.pt: unknown model settings name; ") as error:
        SiTConfig.from_dict({**TINY, "name": "SiT-S/2"}, "ckpt.pt")
    assert "\n" not in str(error.value)


def test_forced_label_drop_replaces_random_dropout():
    model = SiT(SiTConfig(**TINY)).train()
    x, t, cls = torch.randn(3, 4, 8, 8), torch.rand(3), torch.randn(3, 32)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    forced = model(x, t, torch.tensor([1, 2, 3]), cls_token=cls,
                   force_drop_ids=torch.tensor([True, False, True]))[0]
    manual = model.eval()(x, t, torch.tensor([10, 2, 10]), cls_token=cls)[0]
    torch.testing.assert_close(forced, manual)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = SiT(SiTConfig(**TINY))
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.1)
    checkpointed = SiT(SiTConfig(**TINY), grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, t, y, cls = (torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 10]),
                    torch.randn(3, 32))
    for model in (plain, checkpointed):
        out, zs, cls_out = model(x, t, y, cls_token=cls,
                                 force_drop_ids=torch.zeros(3, dtype=torch.bool))
        (out.square().mean() + zs[0].mean() + cls_out.square().mean()).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def counted_flops(model, *args, **kwargs):
    """FLOPs torch's counter sees in one forward pass of explicit-softmax attention (it cannot see
    into every fused SDPA kernel: on the CPU it counts none of the attention)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*args, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("settings", [{}, dict(use_cls_token=False),
                                      dict(z_dims=[], use_cls_token=False),
                                      dict(z_dims=[32, 16], mlp_ratio=2.0, patch_size=4)])
def test_analytic_flops_equal_the_counted_flops(settings):
    model = SiT(SiTConfig(**{**TINY, **settings}), fused_attn=False).eval()
    cls_token = torch.randn(1, model.z_dims[0]) if model.use_cls_token else None
    assert model.flops() == counted_flops(model, torch.randn(1, 4, 8, 8), torch.rand(1),
                                          torch.tensor([1]), cls_token=cls_token)
