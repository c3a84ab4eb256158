import numpy as np
import pytest
import torch

from model.infer import axis_windows, plan_windows, sliding_window
from model.ood import spectral_signature


@pytest.mark.parametrize("n,block,overlap,div", [(200, 96, 24, 8), (96, 96, 24, 8), (50, 96, 24, 8), (97, 32, 8, 4),
                                                (300, 96, 72, 8), (33, 16, 0, 4)])
def test_owned_regions_partition_the_axis(n, block, overlap, div):
    wins = axis_windows(n, block, overlap, div)
    covered = np.zeros(n, int)
    for start, size, lo, hi in wins:
        assert size % div == 0 and size <= block
        assert start <= lo < hi <= start + size  # a window owns only voxels it has seen
        covered[lo:hi] += 1
    assert np.all(covered == 1)


def test_paper_overlap_gives_stride_72():
    starts = [w[0] for w in axis_windows(512, 96, 24, 8)]
    assert starts[:3] == [0, 72, 144] and starts[-1] == 512 - 96
    assert len(plan_windows((300, 512, 512), 96, 24, 8)) == 196


def test_streaming_signature_equals_stitched_svd(small_net, rng):
    vol = rng.normal(size=(37, 45, 30)).astype(np.float32)
    res = sliding_window(small_net, vol, block=16, overlap=4, batch_size=3, return_features=True)
    assert res.n_windows > 8
    assert res.features.shape == (6, 37, 45, 30)
    np.testing.assert_allclose(res.signature, spectral_signature(res.features), atol=1e-4)
    # much tighter in practice: the Gram is exact up to the order of float64 additions
    np.testing.assert_allclose(res.signature, spectral_signature(res.features), atol=1e-9)


def test_stitching_takes_each_voxel_from_its_owning_window(small_net, rng):
    """Rebuild the stitched maps independently, window by window, straight from the network."""
    vol = rng.normal(size=(24, 20, 28)).astype(np.float32)
    res = sliding_window(small_net, vol, block=16, overlap=4, return_features=True)
    probs = np.zeros((2, *vol.shape), np.float32)
    feats = np.zeros((6, *vol.shape), np.float32)
    for w in plan_windows(vol.shape, 16, 4, small_net.divisor):
        x = torch.from_numpy(np.ascontiguousarray(vol[w.read_slices()]))[None, None]
        with torch.no_grad():
            lg, f = small_net(x, return_features=True)
        sl = (slice(None), *w.own_slices())
        loc = (slice(None), *w.local_own_slices())
        probs[sl] = torch.softmax(lg, 1)[0].numpy()[loc]
        feats[sl] = f[0].numpy()[loc]
    np.testing.assert_allclose(res.probabilities, probs, atol=1e-5)
    np.testing.assert_allclose(res.features, feats, atol=1e-5)


def test_single_window_equals_the_network(small_net, rng):
    vol = rng.normal(size=(16, 16, 16)).astype(np.float32)
    res = sliding_window(small_net, vol, block=96, overlap=24)
    with torch.no_grad():
        lg = small_net(torch.from_numpy(vol)[None, None])
    np.testing.assert_allclose(res.probabilities, torch.softmax(lg, 1)[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(res.probabilities.sum(0), 1.0, atol=1e-5)


def test_small_axes_are_padded_and_cropped_back(small_net, rng):
    vol = rng.normal(size=(10, 13, 21)).astype(np.float32)
    res = sliding_window(small_net, vol, block=16, overlap=4, return_features=True)
    assert res.probabilities.shape == (2, 10, 13, 21)
    np.testing.assert_allclose(res.signature, spectral_signature(res.features), atol=1e-9)
    assert res.n_voxels == 10 * 13 * 21
    assert res.class_counts.sum() == res.n_voxels


def test_class_feature_sums_match_stitched_maps(small_net, rng):
    vol = rng.normal(size=(20, 20, 20)).astype(np.float32)
    res = sliding_window(small_net, vol, block=16, overlap=4, return_features=True)
    pred = res.probabilities.argmax(0)
    for k in range(2):
        np.testing.assert_allclose(res.class_feature_sums[k], res.features[:, pred == k].sum(1), rtol=1e-5, atol=1e-3)


def test_float16_output_and_input_checks(small_net, rng):
    vol = rng.normal(size=(16, 16, 16)).astype(np.float32)
    assert sliding_window(small_net, vol, block=16, overlap=4, out_dtype=np.float16).probabilities.dtype == np.float16
    with pytest.raises(ValueError, match="CUDA only"):
        sliding_window(small_net, vol, amp=True)
    with pytest.raises(ValueError, match="floating-point"):
        sliding_window(small_net, vol.astype(np.int16))
    with pytest.raises(ValueError, match="overlap"):
        sliding_window(small_net, np.zeros((40, 40, 40), np.float32), block=16, overlap=16)


def test_signature_layer_is_read_by_a_hook_at_full_resolution():
    """``signature_layer`` (bank version 3: ``encoders.0``): the features and the signature are that module's
    output, stitched window by window; a coarser module or an unknown name is refused."""
    import torch

    from model.ood import spectral_signature
    from model.unet import SegNet

    torch.manual_seed(0)
    net = SegNet(base_features=4, levels=2).eval()
    vol = np.random.default_rng(1).normal(size=(16, 16, 16)).astype(np.float32)
    res = sliding_window(net, vol, block=16, overlap=0, return_features=True, signature_layer="encoders.0",
                         spectrum="centred")
    with torch.inference_mode():
        direct = net.encoders[0](torch.from_numpy(vol)[None, None])[0].numpy()
    np.testing.assert_allclose(res.features, direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.signature, spectral_signature(direct, spectrum="centred"), atol=1e-6)
    default = sliding_window(net, vol, block=16, overlap=0)
    assert np.linalg.norm(default.signature - res.signature) > 1e-3  # the last decoder's, another map
    with pytest.raises(ValueError, match="must give"):
        sliding_window(net, vol, block=16, overlap=0, signature_layer="encoders.1")
    with pytest.raises(ValueError, match="no module"):
        sliding_window(net, vol, block=16, overlap=0, signature_layer="encoders.7")
