"""Fixtures shared by the integration tests (worker, review app)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.unet import SegNet, save_weights


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SegNet]:
    """A small, untrained SegNet saved as a weights file: (path, net)."""
    torch.manual_seed(0)
    net = SegNet(base_features=4, levels=2).eval()
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_weights(net, path, meta={"name": "tiny-test", "version": "0.0.1"})
    return path, net
