"""MAE model, the shared Trainer and encoder export, on the micro size (CPU, seconds)."""

import copy

import pytest
import torch

from mrsfm_model.model.export import export_encoder, load_encoder
from mrsfm_model.model.mae import SpectroMAE, mae_config, mae_loss
from mrsfm_model.training.trainer import OptimConfig, Trainer, param_groups, warmup_cosine


@pytest.fixture
def model():
    torch.manual_seed(0)
    return SpectroMAE(mae_config("micro", img_size=(192, 208), patch_size=(16, 16)))  # the recipe's whole plane


def test_non_square_patch_grid_round_trip(model):
    assert model.cfg.grid_size == (12, 13)
    x = torch.randn(2, 3, 192, 208)
    p = model.patchify(x)
    assert p.shape == (2, 156, 16 * 16 * 3)
    assert torch.equal(model.unpatchify(p), x)
    # patch 0 is the top-left 16x16 block of every channel
    assert torch.equal(p[0, 0].reshape(16, 16, 3).permute(2, 0, 1), x[0, :, :16, :16])


def test_masking_keeps_a_quarter_and_reconstruction_keeps_visible_patches(model):
    x = torch.randn(3, 3, 192, 208)
    loss, pred, mask, latent = model(x, mask_ratio=0.75)
    assert latent is None  # no latent head here
    assert mask.shape == (3, 156)
    assert torch.all(mask.sum(1) == 156 - 39)
    assert len({tuple(m.tolist()) for m in mask}) == 3  # each sample masked differently
    recon = model.reconstruct(x, pred, mask)
    visible = (1 - mask)[0].bool()
    assert torch.allclose(model.patchify(recon)[0, visible], model.patchify(x)[0, visible], atol=1e-5)
    assert torch.isfinite(loss)


def test_position_embedding_is_a_fixed_buffer_and_tokens_live_in_own_modules(model):
    names = dict(model.named_parameters())
    assert "pos_embed" not in names and "decoder_pos_embed" not in names
    assert {"cls_token.token", "mask_token.token"} <= set(names)
    # every module that owns parameters directly has no children doing other work (Opacus hooks)
    for mod in (model.cls_token, model.mask_token):
        assert list(mod.children()) == [] and len(list(mod.parameters())) == 1


def _smooth_images(n):
    """Images whose masked patches are predictable from position (noise would not be)."""
    r = torch.linspace(0, 1, 64)[:, None]
    c = torch.linspace(0, 1, 32)[None, :]
    return torch.stack([torch.sin(6 * r + k) * torch.cos(4 * c) for k in range(n)]).unsqueeze(1).repeat(1, 3, 1, 1)


def test_trainer_overfits_a_batch():
    torch.manual_seed(0)
    model = SpectroMAE(mae_config("micro", norm_pix_loss=False))
    x = _smooth_images(8)
    tr = Trainer(model, mae_loss, OptimConfig.from_config(lr=3e-3, warmup_steps=5), 150, 8, progress=False)
    first = tr.fit(iter(lambda: x, None), 10, log_every=10)["loss"]
    tr.fit(iter(lambda: x, None), 130, log_every=130)
    last = tr.fit(iter(lambda: x, None), 10, log_every=10)["loss"]
    assert last < 0.7 * first


def test_resume_equals_uninterrupted(tmp_path):
    x = torch.randn(4, 3, 64, 32)
    batches = lambda: iter(lambda: x, None)  # noqa: E731

    def fresh():
        torch.manual_seed(1)
        return Trainer(SpectroMAE(mae_config("micro")), mae_loss, OptimConfig.from_config(lr=1e-3, warmup_steps=2), 10, 4,
                       progress=False)

    straight = fresh()
    torch.manual_seed(5)
    straight.fit(batches(), 10)
    first = fresh()
    torch.manual_seed(5)
    first.fit(batches(), 5)
    first.save(tmp_path / "ck")
    second = fresh()
    second.load(tmp_path / "ck")
    assert second.step == 5
    second.fit(batches(), 5)
    for (k, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_param_groups_and_schedule(model):
    groups = param_groups(model, 0.05)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.cls_token.token) not in decayed and id(model.norm.weight) not in decayed
    assert id(model.blocks[0].attn.qkv.weight) in decayed
    llrd = param_groups(model, 0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in llrd for p in g["params"]}
    assert scale[id(model.patch_embed.proj.weight)] == pytest.approx(0.125)  # 2 blocks: 0.5^3
    assert scale[id(model.blocks[1].attn.qkv.weight)] == pytest.approx(0.5)
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("embed_norm", [False, True])
def test_exported_encoder_is_a_timm_vit_with_the_same_features(model, tmp_path, embed_norm):
    if embed_norm:
        torch.manual_seed(1)
        model = SpectroMAE(mae_config("micro", img_size=(192, 208), patch_size=(16, 16), embed_norm=True))
    model.eval()
    path = export_encoder(model, tmp_path / "enc.safetensors", {"note": "test"})
    assert path.with_suffix(".json").exists()
    vit = load_encoder(path, num_classes=3, global_pool="avg").eval()
    x = torch.randn(2, 3, 192, 208)
    ours = model.forward_encoder(x, 0.0)[0][:, 0]  # [CLS] does not depend on token order
    assert torch.allclose(vit.forward_features(x)[:, 0], ours, atol=1e-5)
    assert vit(x).shape == (2, 3)
    # the weights really came from the file: a different model gives different features
    other = SpectroMAE(copy.deepcopy(model.cfg)).eval()
    assert not torch.allclose(other.forward_encoder(x, 0.0)[0][:, 0], ours, atol=1e-3)
