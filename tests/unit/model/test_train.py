import numpy as np
import pytest
import torch

from model.data.phantoms import phantom_case
from model.train import (
    AugmentParams,
    DatasetSampler,
    TrainConfig,
    TrainData,
    apply_augmentation,
    dice_loss,
    draw_augmentation,
    kfold_splits,
    sampling_probabilities,
    train,
)


def test_sqrt_sampling_papers_example():
    p = sampling_probabilities([10, 100])
    np.testing.assert_allclose(p, [0.240, 0.760], atol=5e-4)
    rng = np.random.default_rng(0)
    sampler = DatasetSampler([10, 100])
    draws = [sampler.draw(rng) for _ in range(20000)]
    freq = np.bincount([d for d, _ in draws], minlength=2) / len(draws)
    np.testing.assert_allclose(freq, [0.24, 0.76], atol=0.01)
    # cases are uniform within a dataset
    small = np.bincount([i for d, i in draws if d == 0], minlength=10)
    assert small.min() > 0.7 * small.mean()
    with pytest.raises(ValueError):
        sampling_probabilities([0, 3])


def test_kfold_is_patient_wise_and_covers_everything():
    names = [f"p{i // 2}_scan{i % 2}" for i in range(20)]  # two scans per patient
    splits = kfold_splits(names, 4, seed=3, patient_of=lambda n: n.split("_")[0])
    seen = []
    for tr, val in splits:
        assert not set(tr) & set(val)
        tr_p = {names[i].split("_")[0] for i in tr}
        val_p = {names[i].split("_")[0] for i in val}
        assert not tr_p & val_p
        seen += val
    assert sorted(seen) == list(range(20))
    assert kfold_splits(names, 4, seed=3) == kfold_splits(names, 4, seed=3)
    with pytest.raises(ValueError):
        kfold_splits(names[:2], 4, seed=0)


def test_augmentation_moves_image_and_label_together():
    rng = np.random.default_rng(1)
    x = torch.arange(8**3, dtype=torch.float32).reshape(8, 8, 8)
    y = (x.long() % 7 == 0).to(torch.uint8)
    for _ in range(10):
        a = draw_augmentation(rng, noise_max=0.0)
        xa, ya = apply_augmentation(x, y, a)
        # the label still marks the same intensities
        assert torch.equal((xa.long() % 7 == 0).to(torch.uint8), ya)
        assert sorted(xa.flatten().tolist()) == sorted(x.flatten().tolist())
    a = AugmentParams((False, False, False), (0, 0, 0), 0.1, 5)
    xn, _ = apply_augmentation(x, y, a)
    xn2, _ = apply_augmentation(x, y, a)
    assert torch.equal(xn, xn2) and not torch.equal(xn, x)  # recorded seed -> same noise


def test_dice_loss_values():
    t = torch.zeros(1, 4, 4, 4, dtype=torch.uint8)
    t[0, :2] = 1
    perfect = torch.stack([(1 - t.float()) * 20, t.float() * 20], 1)
    assert float(dice_loss(perfect, t)) == pytest.approx(-1.0, abs=1e-3)
    assert float(dice_loss(-perfect, t)) > -0.05


def _data(block=16):
    cases = {k: [phantom_case(k, 0, i) for i in range(3)] for k in ("ct_liver", "mr_prostate")}
    # crop to keep it small and fast
    small = {}
    for k, cs in cases.items():
        small[k] = [type(c)(**{**c.__dict__, "image": c.image[:20, 20:52, 20:52], "label": c.label[:20, 20:52, 20:52]})
                    for c in cs]
    return TrainData.from_cases(small, block=block)


CFG = dict(block=16, base_features=4, levels=2, lr=3e-3, eval_every=15, patience=10, seed=4, noise_max=0.0)


def test_short_training_lowers_the_loss(tmp_path):
    res = train(_data(), tmp_path, TrainConfig(**CFG, max_iterations=60), progress=False)
    first, last = res.history[0]["train_loss"], res.history[-1]["train_loss"]
    assert last < first - 0.05, res.history
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "train_log.json").is_file()


def test_seeded_runs_repeat_and_resume_continues_the_same_run(tmp_path):
    straight = train(_data(), tmp_path / "a", TrainConfig(**CFG, max_iterations=30), progress=False)
    train(_data(), tmp_path / "b", TrainConfig(**CFG, max_iterations=15), progress=False)
    resumed = train(_data(), tmp_path / "b", TrainConfig(**CFG, max_iterations=30), resume=True, progress=False)
    assert resumed.iterations == 30
    assert [h["train_loss"] for h in resumed.history] == pytest.approx(
        [h["train_loss"] for h in straight.history], abs=1e-5)
    with pytest.raises(ValueError, match="other settings"):
        train(_data(), tmp_path / "b", TrainConfig(**{**CFG, "lr": 1.0}, max_iterations=40), resume=True,
              progress=False)


def test_validation_fold_is_used(tmp_path):
    res = train(_data(), tmp_path, TrainConfig(**{**CFG, "eval_every": 5}, max_iterations=5, folds=3, fold=1,
                                               val_blocks=1), progress=False)
    h = res.history[0]
    assert h["eval_loss"] != h["train_loss"]
