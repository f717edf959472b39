"""Real accuracy on MNIST (slow): a small VGG-style CNN trained here, then converted with "opt"."""
import gzip
import os
import pickle

import pytest
import torch
from torch import nn

import hmtconv.conversion as hc

mnist = pytest.importorskip("mnist")


def _mnist():
    path = os.path.join(os.path.dirname(mnist.__file__), "data", "mnist.pkl.gz")
    with gzip.open(path) as f:
        train, _, test = pickle.load(f, encoding="latin1")
    as_images = lambda split: (torch.tensor(split[0]).view(-1, 1, 28, 28), torch.tensor(split[1]).long())
    return as_images(train), as_images(test)


@pytest.mark.slow
def test_vgg_style_mnist_opt_within_a_point_of_the_ann():
    torch.manual_seed(0)
    (x_train, y_train), (x_test, y_test) = _mnist()
    block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
    model = nn.Sequential(*block(1, 8), nn.MaxPool2d(2), *block(8, 16), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(16 * 49, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for i in range(0, 20000, 100):
        loss = nn.functional.cross_entropy(model(x_train[i:i + 100]), y_train[i:i + 100])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    calib = [(x_train[i:i + 256], y_train[i:i + 256]) for i in range(0, 1024, 256)]
    test = [(x_test[i:i + 500], y_test[i:i + 500]) for i in range(0, 2000, 500)]
    snn = hc.convert(model, calib, n=4, T=8, policy="opt")
    result = hc.evaluate(snn, test, ann=model)
    assert result.ann_accuracy > 95
    assert result.snn_accuracy[-1] > result.ann_accuracy - 1.0
    assert result.snn_accuracy[-1] >= result.snn_accuracy[0] - 0.5
    assert 0 < result.energy_ratio[0] < result.energy_ratio[-1]
