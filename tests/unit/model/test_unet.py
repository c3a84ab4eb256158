import pytest
import torch

from model.unet import SegNet, load_weights, save_weights


def test_forward_shapes_and_features():
    net = SegNet(in_channels=1, num_classes=3, base_features=5, levels=3).eval()
    x = torch.randn(2, 1, 16, 24, 32)
    with torch.no_grad():
        logits, feats = net(x, return_features=True)
        plain = net(x)
    assert logits.shape == (2, 3, 16, 24, 32)
    assert feats.shape == (2, 5, 16, 24, 32)
    assert torch.equal(logits, plain)
    # the head is the only thing between the features and the logits
    assert torch.allclose(net.head(feats), logits, atol=1e-6)


def test_dense_encoder_skips_feed_every_coarser_stage():
    net = SegNet(base_features=4, levels=4)
    widths = [4, 8, 16, 32]
    # stage k reads the concatenation of all finer encoder outputs
    for k, block in enumerate(net.encoders):
        expected_in = 1 if k == 0 else sum(widths[:k])
        assert block.conv1.in_channels == expected_in
        assert block.conv2.out_channels == widths[k]


def test_residual_blocks_have_shortcuts():
    net = SegNet(base_features=4, levels=2)
    assert all(hasattr(b, "shortcut") for b in list(net.encoders) + list(net.decoders))


def test_rejects_sizes_not_divisible():
    net = SegNet(base_features=4, levels=3)
    with pytest.raises(ValueError, match="multiple of 4"):
        net(torch.zeros(1, 1, 16, 16, 18))


@pytest.mark.parametrize("kw", [{"levels": 0}, {"dropout": 1.0}, {"base_features": 0}])
def test_rejects_bad_config(kw):
    with pytest.raises(ValueError):
        SegNet(**kw)


def test_weights_roundtrip(tmp_path):
    net = SegNet(base_features=4, levels=2, dropout=0.1).eval()
    sha = save_weights(net, tmp_path / "w.pt", {"note": "x"})
    assert len(sha) == 64
    net2, meta = load_weights(tmp_path / "w.pt")
    assert meta == {"note": "x"}
    assert net2.config == net.config
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(net(x), net2(x))


def test_load_refuses_other_files(tmp_path):
    torch.save({"format": "other"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a specgate weights file"):
        load_weights(tmp_path / "x.pt")
