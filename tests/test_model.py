"""Batch-norm folding for inference: same outputs, same Grad-CAM layer, fewer modules."""

import copy

import pytest
import torch

from covidxr.model import build_model, fold_batch_norms, gradcam_layer_name


def _with_trained_statistics(model: torch.nn.Module) -> torch.nn.Module:
    # Fresh batch norms are identities; give them statistics like a trained network's.
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            for tensor, (low, high) in ((module.running_mean, (-0.5, 0.5)), (module.running_var, (0.5, 2.0)),
                                        (module.weight.data, (0.5, 1.5)), (module.bias.data, (-0.2, 0.2))):
                tensor.copy_(low + (high - low) * torch.rand(tensor.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("arch", ["cxrnet", "resnet18", "densenet121", "efficientnet_b0", "efficientnet_lite0"])
def test_folding_keeps_the_outputs_and_the_cam_layer(arch):
    model = _with_trained_statistics(build_model(arch, 3))
    folded = fold_batch_norms(copy.deepcopy(model))
    inputs = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(inputs), model(inputs), atol=1e-5, rtol=1e-4)
    before = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    after = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert after < before
    folded.get_submodule(gradcam_layer_name(arch))  # still there by name, for the CAM hooks


def test_shipped_models_load_folded(predictor):
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in predictor.model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in predictor.segmenter.model.modules())
