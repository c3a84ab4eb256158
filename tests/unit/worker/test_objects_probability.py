"""worker.objects.save_probability: the review app's file, written quickly, with a label map beside it."""

from pathlib import Path

import numpy as np

from worker.objects import load_mask, save_probability


def test_probability_file_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    fg = rng.random((20, 9, 7)).astype(np.float16)
    labels = rng.integers(0, 4, size=fg.shape).astype(np.uint8)
    save_probability(tmp_path / "prob.npz", fg, labels > 0,
                     extra={"labels": labels, "label_names": np.array(["a", "b", "c"])})
    with np.load(tmp_path / "prob.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["prob_fg_u8"], np.rint(fg.astype(np.float32) * 255).astype(np.uint8))
        assert float(z["scale"]) == np.float32(1 / 255) and tuple(z["shape"]) == fg.shape
        np.testing.assert_array_equal(z["labels"], labels)
        assert z["label_names"].tolist() == ["a", "b", "c"]
    np.testing.assert_array_equal(load_mask(tmp_path / "prob.npz"), labels > 0)
