"""The timing backends: eager and CUDA time the BN-folded net, which must compute what the net computes."""
import torch
from torch import nn

import slimcnn
from slimcnn.backends import fold_bn


def _with_running_stats(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, as a trained net has (fresh ones fold to an identity and prove nothing)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def test_fold_bn_removes_every_bn_and_keeps_the_outputs():
    model = _with_running_stats(slimcnn.create("cifar_resnet20"))
    folded = fold_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the caller's net is left as it was
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert torch.allclose(ref, out, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y  # data-dependent branch: torch.fx cannot trace it


def test_fold_bn_times_an_untraceable_net_unfolded():
    model = _Untraceable().train()
    assert fold_bn(model) is model and not model.training

