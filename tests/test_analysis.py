"""analysis/predictions.py: misclassified ordering, per-class statistics, confusion pairs, layer lookup and batched GradCAM."""

import numpy as np
import pytest
import torch

from cifar_mlflow import data, models
from cifar_mlflow.analysis import gradcam, predictions
from cifar_mlflow.errors import ModelError
from cifar_mlflow.training import engine, hardware


def _preds(probs, labels):
    return predictions.Predictions(np.asarray(probs, np.float32), np.asarray(labels), loss=0.0)


def test_misclassified_most_confident_first_ties_by_index():
    p = _preds([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]], [1, 1, 1, 0, 1, 0])
    # wrong: 0 (conf .9), 2 (.6), 3 (.7), 4 (.6), 5 (.9)
    assert predictions.misclassified(p).tolist() == [0, 5, 3, 2, 4]
    assert p.accuracy == pytest.approx(1 / 6)


def test_confusion_matrix_and_per_class_stats():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 1, 0])
    cm = predictions.confusion_matrix(labels, predicted, 3)
    assert cm.tolist() == [[1, 2, 0], [0, 2, 0], [1, 0, 0]]
    stats = predictions.per_class_stats(cm)
    np.testing.assert_allclose(stats["accuracy"], [1 / 3, 1.0, 0.0])
    np.testing.assert_allclose(stats["precision"], [0.5, 0.5, 0.0])
    assert stats["support"].tolist() == [3, 2, 1]
    assert predictions.most_confused_pairs(cm, ["a", "b", "c"], k=5) == [("a", "b", 2, 2 / 3), ("c", "a", 1, 1.0)]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return models.build_model(
        models.ModelSpec("resnet18", data.SYNTHETIC_CLASSES, (0.4,) * 3, (0.2,) * 3, width=16)
    ).eval()


def test_resolve_layers(net):
    names = [n for n, _ in gradcam.resolve_layers(net, "layer3, layer4.1.conv2")]
    assert names == ["layer3", "layer4.1.conv2"]
    with pytest.raises(ModelError) as err:
        gradcam.resolve_layers(net, "layer3,layer5")
    msg = str(err.value)
    assert "'layer5' is not a layer" in msg and "layer1, layer2, layer3, layer4" in msg and "\n" not in msg


def test_gradcam_maps_shape_range_batched_equals_per_image_and_hooks_released(net):
    images = torch.from_numpy(data.make_synthetic(6, seed=3).images.transpose(0, 3, 1, 2) / 255.0).float()
    classes = [0, 3, 5, 1, 9, 2]
    batched = gradcam.gradcam_maps(net, net.layer3, images, classes, batch_size=6)
    assert batched.shape == (6, 32, 32) and batched.dtype == np.float32
    assert batched.min() >= 0 and batched.max() <= 1 and batched.max() > 0.5
    single = np.concatenate(
        [gradcam.gradcam_maps(net, net.layer3, images[i : i + 1], classes[i : i + 1]) for i in range(6)]
    )
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert not net.layer3._forward_hooks and not net.layer3._backward_hooks
    pred, true = gradcam.gradcam_pairs(net, net.layer4, images, classes, classes[::-1], batch_size=4)
    np.testing.assert_allclose(pred, gradcam.gradcam_maps(net, net.layer4, images, classes), atol=1e-5)
    np.testing.assert_allclose(true, gradcam.gradcam_maps(net, net.layer4, images, classes[::-1]), atol=1e-5)


@pytest.mark.parametrize("layer_name", ["layer3", "layer4", "layer4.1.conv2"])
def test_gradcam_backward_only_to_the_layer_gives_the_notebook_maps(net, layer_name):
    """The pruned backward (parameters outside the layer frozen for the call) changes no map: compared with
    grad-cam used the notebook way (full backward, every weight gradient)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    images = torch.from_numpy(data.make_synthetic(5, seed=8).images.transpose(0, 3, 1, 2) / 255.0).float()
    classes = [2, 7, 0, 4, 9]
    layer = dict(net.named_modules())[layer_name]
    with GradCAM(model=net, target_layers=[layer]) as cam:
        full = cam(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in classes])
    np.testing.assert_allclose(gradcam.gradcam_maps(net, layer, images, classes), full, atol=1e-5)
    assert all(p.requires_grad for p in net.parameters())


def test_gradcam_restores_requires_grad_on_error(net):
    images = torch.zeros(2, 3, 32, 32)
    with pytest.raises(IndexError):
        gradcam.gradcam_maps(net, net.layer3, images, [0, 10])  # no class 10
    assert all(p.requires_grad for p in net.parameters())
    assert not net.layer3._forward_hooks


def test_gradcam_of_predictions_one_pass_equals_predict_then_explain(net):
    images = torch.from_numpy(data.make_synthetic(7, seed=9).images.transpose(0, 3, 1, 2) / 255.0).float()
    maps, probs = gradcam.gradcam_of_predictions(net, net.layer3, images, batch_size=4)
    expected = models.predict_proba(net, images).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_allclose(
        maps, gradcam.gradcam_maps(net, net.layer3, images, expected.argmax(1).tolist()), atol=1e-5
    )


def test_predict_agrees_with_engine_evaluate(net):
    split = data.make_synthetic(50, seed=4)
    loader = data.make_loader(split, batch_size=16, train=False)
    cpu = torch.device("cpu")
    precision = hardware.resolve_precision("auto", cpu)  # never a forced bf16: emulated (10x slower) on some CPUs
    model = net.to(memory_format=torch.channels_last)
    pred = predictions.predict(model, loader, cpu, precision)
    ev = engine.evaluate(model, loader, cpu, precision)
    assert pred.accuracy == ev["test/accuracy"] and pred.loss == pytest.approx(ev["test/loss"], rel=1e-6)
    assert pred.probs.shape == (50, 10) and np.allclose(pred.probs.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(pred.labels, split.labels)
