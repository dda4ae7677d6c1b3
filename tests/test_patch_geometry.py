"""The official patch grid GPM's miniImageNet script uses (METHODS_SPEC §1.6, §3.3), reproduced by `--faithful`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ness.experiment import resolve_settings
from ness.methods import GPM, GPMConfig
from ness.methods.base import adaptable_layers
from ness.models import reduced_resnet18
from ness.presets import RESNET32_PATCH_GEOMETRY
from ness.runs import RunSpec
from ness.subspace import layer_input_rows


def official_patches(x: torch.Tensor, kernel: int, padding: int, stride: int, size: int) -> torch.Tensor:
    """The official loop: pad, then for i, j < s take x[:, :, st·i : st·i+k, st·j : st·j+k], s = ⌊(m+2p−k)/st⌋+1;
    rows ordered (sample, i, j), each patch flattened (C, row, col)."""
    padded = F.pad(x, (padding,) * 4)
    s = (size + 2 * padding - kernel) // stride + 1
    rows = []
    for b in range(x.shape[0]):
        for i in range(s):
            for j in range(s):
                rows.append(padded[b, :, stride * i : stride * i + kernel, stride * j : stride * j + kernel].flatten())
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("kernel", "padding", "layer_stride", "geometry", "side"),
    [(3, 1, 2, (1, 32), 84), (3, 1, 1, (2, 32), 42), (1, 0, 2, (2, 8), 21), (3, 1, 1, (1, 4), 6)],
)
def test_geometry_rows_match_the_official_loop(kernel, padding, layer_stride, geometry, side):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel, stride=layer_stride, padding=padding, bias=False)
    x = torch.randn(2, 2, side, side)
    expected = official_patches(x, kernel, padding, *geometry)
    torch.testing.assert_close(layer_input_rows(conv, x, geometry), expected)


def test_without_geometry_the_rows_are_the_convs_own():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 2, 9, 9)
    rows = layer_input_rows(conv, x)
    out = (rows @ conv.weight.view(3, -1).T).view(2, 5, 5, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, conv(x))


def test_a_grid_larger_than_the_input_is_an_error():
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    with pytest.raises(ValueError, match="assumes a larger input"):
        layer_input_rows(conv, torch.zeros(1, 2, 16, 16), (1, 32))


def test_the_preset_geometry_is_the_specs_lists_in_our_layer_order():
    names = list(adaptable_layers(reduced_resnet18([5], input_size=84)))
    assert len(RESNET32_PATCH_GEOMETRY) == len(names) == 20
    convs3 = [g for n, g in zip(names, RESNET32_PATCH_GEOMETRY, strict=True) if "shortcut" not in n]
    assert [g[0] for g in convs3] == [1, 1, 1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1]
    assert [g[1] for g in convs3] == [32, 32, 32, 32, 32, 32, 16, 16, 16, 16, 8, 8, 8, 8, 4, 4, 4]
    shortcuts = {n: g for n, g in zip(names, RESNET32_PATCH_GEOMETRY, strict=True) if "shortcut" in n}
    assert shortcuts == {
        "backbone.layer2.0.shortcut.0": (2, 32),
        "backbone.layer3.0.shortcut.0": (2, 16),
        "backbone.layer4.0.shortcut.0": (2, 8),
    }


def test_faithful_miniimagenet_gpm_uses_the_32_grid_and_counts_its_rows():
    options = resolve_settings(RunSpec("split_miniimagenet", "gpm", 1, "paper", faithful=True)).options
    assert options["patch_geometry"] == RESNET32_PATCH_GEOMETRY
    fixed = resolve_settings(RunSpec("split_miniimagenet", "gpm", 1, "paper")).options
    assert "patch_geometry" not in fixed
    torch.manual_seed(0)
    model = reduced_resnet18([5, 5], input_size=84)
    method = GPM(model, GPMConfig(samples=2, patch_geometry=RESNET32_PATCH_GEOMETRY))
    method.begin_task(0)
    method.end_task(0, [torch.randn(2, 3, 84, 84)])
    rows = {r["layer"]: r["rows"] for r in method.diagnostics()}
    assert rows["backbone.conv1"] == 2 * 32 * 32  # the stem at stride 1 over a 32×32 corner, not 42×42 at stride 2
    assert rows["backbone.layer2.0.shortcut.0"] == 2 * 16 * 16
    assert rows["backbone.layer4.1.conv2"] == 2 * 4 * 4


def test_patch_geometry_is_validated():
    with pytest.raises(ValueError, match="patch_geometry"):
        GPMConfig(patch_geometry=((1, 0),))
    model = reduced_resnet18([5], input_size=32)
    with pytest.raises(ValueError, match="patch_geometry has 1 entries"):
        GPM(model, GPMConfig(patch_geometry=((1, 32),)))
