"""The foundation model's pieces: random-init control, flat readout, denoising stream, the shipped
model (card, timm, init for more pretraining) and the refusals around it."""

import json

import pytest
import torch

from mrsfm_model.config import load_config
from mrsfm_model.errors import MRSDataError
from mrsfm_model.evaluation.networks import RANDOM_INIT, start_network
from mrsfm_model.model.export import build_vit, encoder_state, init_mae, load_encoder, read_encoder_config, shipped
from mrsfm_model.model.mae import SpectroMAE, build_mae, mae_config


def test_random_init_control_is_the_mae_encoder_before_pretraining():
    cfg = mae_config("micro", patch_size=(2, 32))
    torch.manual_seed(3)
    vit = start_network(RANDOM_INIT, cfg, 3, "flat")
    torch.manual_seed(3)
    ref = encoder_state(SpectroMAE(cfg))
    got = vit.state_dict()
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    torch.manual_seed(3)
    timm_init = start_network(None, cfg, 3, "flat").state_dict()  # the scratch arm: timm's own initialisation
    assert not torch.equal(timm_init["blocks.0.attn.qkv.weight"], ref["blocks.0.attn.qkv.weight"])


def test_flat_readout_keeps_each_band_in_its_place():
    cfg = mae_config("micro", patch_size=(2, 32))
    vit = build_vit(cfg, num_classes=0, global_pool="flat").eval()
    x = torch.randn(2, 3, 64, 32)
    tokens = vit.forward_features(x)
    feats = vit.forward_head(tokens, pre_logits=True)
    assert feats.shape == (2, 32 * 64) and torch.equal(feats, tokens[:, 1:].flatten(1))
    vit.reset_classifier(3)
    assert vit(x).shape == (2, 3)


def test_denoising_stream_targets_are_the_same_draws_without_noise():
    from mrsfm_model.data.stream import build_stream

    cfg = load_config(["data.denoise=true", "data.batch_size=4", "data.sim_profiles=[megapress_ge]", "device=cpu"])
    stream = build_stream(cfg.data, seed=5)
    batch = stream.sim_batch(7)
    assert batch.target is not None and batch.target.shape == batch.x.shape
    assert not torch.allclose(batch.target, batch.x)
    assert (batch.target - batch.x).abs().mean() < 0.2 * batch.x.abs().mean()  # same spectra, noise removed
    mixed = stream.batch(7)
    assert mixed.target is not None and mixed.target.shape == mixed.x.shape
    loss = build_mae(cfg.model, cfg.data)(mixed.x, target=mixed.target)[0]
    assert torch.isfinite(loss)


def test_shipped_model_loads_with_its_card_and_through_timm():
    import timm

    import mrsfm_model.model.hub  # noqa: F401  (registers mrsfm_micro)

    path = shipped()
    card = json.loads(path.with_suffix(".json").read_text())
    for key in ("command", "trained_steps", "final_loss", "spectrogram", "grid", "channels", "benchmark"):
        assert key in card, key
    assert "mrsfm pretrain" in card["command"]
    from mrsfm_model.model.quantifier import has_quantifier

    assert has_quantifier(path) and card["latent_head"]["outputs"][:2] == ["tNAA", "GABA"]  # its own quantifier
    assert path.stat().st_size + shipped("mae").stat().st_size < 25e6
    ours = load_encoder(path, num_classes=3, global_pool="avg")  # timm's default pool, as create_model
    theirs = timm.create_model("mrsfm_micro", pretrained=True, num_classes=3)
    for k, v in ours.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(theirs.state_dict()[k], v), k
    fresh = timm.create_model("mrsfm_micro", pretrained=False, num_classes=3)
    assert not torch.equal(fresh.state_dict()["blocks.0.attn.qkv.weight"], ours.state_dict()["blocks.0.attn.qkv.weight"])
    # the shipped encoder is the default configuration's model (its pretext may be an older recipe's)
    cfg = load_config([])
    assert read_encoder_config(path).architecture() == build_mae(cfg.model, cfg.data).cfg.architecture()


def test_pretraining_continues_from_the_shipped_model_and_refuses_another_architecture(tmp_path):
    cfg = load_config([])
    model = build_mae(cfg.model, cfg.data)
    assert init_mae(model, "shipped") == shipped("mae")
    mae_state = model.state_dict()
    enc = load_encoder(shipped(), global_pool="avg")
    assert torch.equal(enc.state_dict()["blocks.0.attn.qkv.weight"], mae_state["blocks.0.attn.qkv.weight"])
    other = build_mae(load_config(["model.patch_size=[8,8]"]).model, cfg.data)
    with pytest.raises(MRSDataError, match=r"mae\.safetensors: init weights are another model than this run's: patch_size"):
        init_mae(other, "shipped")
    with pytest.raises(MRSDataError, match="init weights not found"):
        init_mae(model, tmp_path / "nope.safetensors")


def test_missing_shipped_model_is_a_clear_error(monkeypatch, tmp_path):
    import mrsfm_model.model.export as export

    monkeypatch.setattr(export, "SHIPPED_DIR", tmp_path)
    with pytest.raises(MRSDataError, match=str(tmp_path) + ".*shipped pretrained model is missing"):
        export.shipped()


@pytest.mark.slow  # a real pretraining stream over every profile
def test_transfer_split_keeps_every_benchmark_generator_out_of_pretraining():
    from mrsfm_model.data.stream import build_stream
    from mrsfm_model.evaluation.tasks import VENDOR_PROFILES, build_benchmark, generators_seen

    transfer = load_config(["data=transfer", "device=cpu"])
    assert generators_seen(transfer.data.sim_profiles) == []
    assert generators_seen(load_config([]).data.sim_profiles) == list(VENDOR_PROFILES)  # the default is in-distribution
    stream = build_stream(transfer.data, seed=0)
    bench_bases = {_basis_of(p) for p in VENDOR_PROFILES}
    assert not {s.profile.basis_path().resolve() for s in stream.simulators} & bench_bases
    # ...while the stream still makes the images the benchmark makes
    bench = build_benchmark(stream.simulators[0].grid, stream.transform, stream.channels, subjects_per_vendor=2,
                            scans_per_subject=2, test_fraction=0.5, seed=0)
    assert stream.sim_batch(0, k=4).x.shape[1:] == bench.x.shape[1:]


def _basis_of(profile: str):
    from mrsfm_model.data.simulate import load_profile

    return load_profile(profile).basis_path().resolve()


def test_every_shipped_encoder_reproduces_its_cards_input_settings():
    """What the card says the encoder was pretrained on is what this release feeds it (grid,
    spectrogram, channels), and `--encoder NAME` finds each shipped model."""
    from mrsfm_model.data.stream import InputBuilder
    from mrsfm_model.evaluation.networks import input_differences
    from mrsfm_model.model.export import resolve_encoder, shipped_names

    builder = InputBuilder.from_data_config(load_config([]).data)
    assert "mrsfm_micro" in shipped_names()
    for name in shipped_names():
        path = shipped(name=name)
        assert resolve_encoder(name.removeprefix("mrsfm_")) == path == resolve_encoder(name)
        assert input_differences(path, builder) == []
        card = json.loads(path.with_suffix(".json").read_text())
        assert card["spectrogram"] == {k: getattr(builder.spec_cfg, k) for k in card["spectrogram"]}
        assert path.stat().st_size + shipped("mae", name=name).stat().st_size <= 25e6
        vit = load_encoder(path, num_classes=3, global_pool="avg")
        assert all(p.dtype == torch.float32 for p in vit.parameters())  # bf16-stored weights load as fp32
