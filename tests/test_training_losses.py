"""Loss (paper eq. 3) and the model factory."""

from __future__ import annotations

import pytest
from conftest import require

torch = require("torch")

from mris.training.losses import triplet_loss, triplet_loss_from_similarity  # noqa: E402
from mris.training.models import ModelConfig, build_model  # noqa: E402


def test_loss_equals_hand_computation_on_3x3():
    s = torch.tensor([[0.9, 0.85, 0.2], [0.5, 0.3, 0.35], [0.1, 0.95, 0.6]])
    # row a: sum over b != a of max(0, 0.1 + S[a,b] - S[a,a])
    row0 = max(0, 0.1 + 0.85 - 0.9) + max(0, 0.1 + 0.2 - 0.9)  # 0.05 + 0
    row1 = max(0, 0.1 + 0.5 - 0.3) + max(0, 0.1 + 0.35 - 0.3)  # 0.3 + 0.15
    row2 = max(0, 0.1 + 0.1 - 0.6) + max(0, 0.1 + 0.95 - 0.6)  # 0 + 0.45
    expected = row0 + row1 + row2
    assert triplet_loss_from_similarity(s, margin=0.1).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.95)


def test_loss_is_one_direction_and_zero_when_separated():
    x = torch.eye(3, 512)
    assert triplet_loss(x, x).item() == 0.0  # S = I: positives 1, negatives 0, margin 0.1 met
    s = torch.tensor([[1.0, 0.95], [0.0, 0.2]])  # rows are queries (radiographs)
    assert triplet_loss_from_similarity(s).item() == pytest.approx(0.05)
    assert triplet_loss_from_similarity(s.t()).item() == pytest.approx(0.85)  # not symmetric


def test_encoder_is_one_channel_512d_unit_norm():
    torch.manual_seed(0)
    model = build_model(ModelConfig("encoder")).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 1, 32, 48))
    assert out.shape == (3, 512)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_init_weights_load_from_an_explicit_file(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(1)
    source = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = build_model(ModelConfig("encoder", init_weights=str(path)))
    assert torch.equal(model.backbone.conv1.weight, source.conv1.weight)
    with pytest.raises(FileNotFoundError):
        build_model(ModelConfig("encoder", init_weights=str(tmp_path / "missing.pth")))
