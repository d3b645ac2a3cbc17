"""Grad-CAM: shape, range, localisation on a synthetic image, hook and memory hygiene."""
import gc
import tracemalloc

import torch
import torch.nn as nn

from gradCAM_evaluation import GradCAM


class RegionNet(nn.Module):
    """Positive 3x3 filters -> ReLU -> global pool -> linear: class 1 is driven by bright pixels."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.features[0].weight.fill_(0.1)
            self.features[0].bias.fill_(-0.05)
            self.fc.weight.copy_(torch.tensor([[-1.0, -1.0, -1.0, -1.0], [1.0, 1.0, 1.0, 1.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def test_map_shape_range_and_peak_in_signal_region():
    model = RegionNet().eval()
    x = torch.zeros(2, 3, 20, 24)
    x[0, :, 12:18, 16:22] = 1.0  # signal bottom-right
    x[1, :, 2:7, 3:8] = 1.0  # signal top-left
    x0 = x.clone()
    with GradCAM(model, model.features) as cam:
        maps = cam(x, torch.tensor([1, 1]))
    assert maps.shape == (2, 20, 24)
    assert maps.min() >= 0 and maps.max() <= 1 and torch.allclose(maps.flatten(1).max(1).values, torch.ones(2))
    peak0 = divmod(int(maps[0].argmax()), 24)
    peak1 = divmod(int(maps[1].argmax()), 24)
    assert 11 <= peak0[0] <= 18 and 15 <= peak0[1] <= 22
    assert 1 <= peak1[0] <= 7 and 2 <= peak1[1] <= 8
    assert maps[0, :8, :10].max() < 0.2  # nothing where there is no signal
    assert torch.equal(x, x0)
    assert not model.features._forward_hooks
    assert all(p.grad is None for p in model.parameters())


def test_repeated_use_does_not_grow_memory():
    model = RegionNet().eval()
    x = torch.rand(4, 3, 16, 16)
    with GradCAM(model, model.features) as cam:
        for _ in range(5):
            cam(x)
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(50):
            cam(x)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
    assert grown < 200_000, grown
    assert cam._act is None and cam._grad is None and not cam._handles
