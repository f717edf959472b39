"""The bad-input catalogue: each mistake gives a clear error (one line and exit 2 from the CLI) or,
where the input is usable, a warning; nothing already written is lost. Plus determinism."""
import errno
import functools
import importlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import hmtconv.conversion as hc
import hmtconv.report.io as report_io
from hmtconv.cli import main


def cnn(channels: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 64, 10)).eval()


def images(batches=2, batch=4, shape=(1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(batches)]


class ConvHead(nn.Module):
    """A conv and a Linear head; each test's forward puts something of its own between them."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 10)


@pytest.fixture(scope="module")
def snn():
    return hc.convert(cnn(), images(), T=2)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A small pickled CNN for 1-channel 28x28 images (MNIST)."""
    path = tmp_path_factory.mktemp("m") / "cnn.pt"
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(4 * 36, 10)).eval(), path)
    return str(path)


def cli(argv, capsys):
    """(exit status, stderr) of ``hmtconv ARGV`` run in-process."""
    try:
        status = main(argv)
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    return status, capsys.readouterr().err


def one_line_error(status, err, text):
    lines = [line for line in err.splitlines() if not line.startswith("hmtconv: warning:")]
    assert status == 2 and len(lines) == 1 and "error:" in lines[0] and text in lines[0], err
    assert "Traceback" not in err


QUICK = ["--dataset", "mnist", "--limit", "16", "--calib-size", "16", "--batch-size", "16", "--T", "2"]


def test_nan_or_inf_in_input_images(snn):
    bad = images()
    bad[1][0][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="calibration batch 1 has NaN or inf in its input images"):
        hc.convert(cnn(), bad)
    with pytest.raises(ValueError, match="calibration batch 0 has NaN or inf in its input images"):
        hc.convert(cnn(), bad[1:])
    bad[1][0][0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="evaluation batch 1 has NaN or inf"):
        hc.evaluate(snn, bad)


def test_nan_or_inf_in_activations_names_the_layer():
    model = cnn()
    with torch.no_grad():
        model[2].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf in the activations entering 3 during calibration"):
        hc.convert(model, images())


def test_constant_layer_gets_finite_thresholds_and_a_warning():
    model = cnn()
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.fill_(0.5)  # every activation entering site "3" is 0.5: sigma = 0
    with pytest.warns(UserWarning, match=r"constant activations \(sigma = 0\) at 3:"):
        snn = hc.convert(model, images())
    assert all(torch.isfinite(site.neuron.lam).all() for site in snn.sites().values())
    assert torch.isfinite(snn(images()[0][0])).all()


def test_empty_calibration_loader():
    with pytest.raises(ValueError, match="calibration loader yielded no batches"):
        hc.convert(cnn(), [])


@pytest.mark.parametrize("label", [10, -1])
def test_labels_out_of_range(snn, label):
    data = images()
    data[0][1][2] = label
    with pytest.raises(ValueError, match=rf"label {label} is outside 0..9 \(the model has 10 outputs\)"):
        hc.evaluate(snn, data)


def test_evaluation_batches_of_other_forms(snn):
    data = images()
    expected = hc.evaluate(snn, data).to_dict()
    assert hc.evaluate(snn, [(x, y.tolist()) for x, y in data]).to_dict() == expected  # labels as a list
    assert hc.evaluate(snn, [[x, y, "path"] for x, y in data]).to_dict() == expected  # (images, labels, extra)
    for batches, error, text in [([x for x, _ in data], TypeError, r"accuracy needs \(images, labels\) batches, "
                                   r"got images only"),
                                  ([(x, nn.functional.one_hot(y, 10)) for x, y in data], ValueError, "one-hot"),
                                  ([(x, y[:, None]) for x, y in data], ValueError,  # not argmax(1): all zeros
                                   r"of shape \[4, 1\]; pass labels.view\(-1\)$"),
                                  ([(x, y[:-1]) for x, y in data], ValueError, "has 4 images but 3 labels"),
                                  ([(x, y > 4) for x, y in data], ValueError, "1-D integer tensor .* got torch.bool"),
                                  ([{"image": x, "label": y} for x, y in data], TypeError, "got dict")]:
        with pytest.raises(error, match=text):
            hc.evaluate(snn, batches)


def test_a_dataset_passed_for_a_loader_is_named(snn):
    dataset = torch.utils.data.TensorDataset(*map(torch.cat, zip(*images())))  # yields one unbatched sample at a time
    hint = r"it has a single label: is it one sample of a dataset\? iterate a torch.utils.data.DataLoader"
    with_bn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 64, 10)).eval()  # (BatchNorm's own error is a ValueError)
    for model in (cnn(), with_bn):
        with pytest.raises(ValueError, match=r"cannot run calibration batch 0 of shape \[1, 8, 8\]: .*" + hint):
            hc.convert(model, dataset)
    with pytest.raises(ValueError, match="labels must be a 1-D integer tensor .* of shape \\[\\]; " + hint):
        hc.evaluate(snn, dataset)


def test_outputs_other_than_logits_are_a_clear_error_in_evaluate():
    head = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 10, 1)).eval()
    snn = hc.convert(head, images(), T=2)  # converts: logits [B, 10, 1, 1]
    for ann in (None, head):
        who = "the SNN" if ann is None else "the ANN Sequential"
        with pytest.raises(ValueError, match=rf"batch 0: {who} returns outputs of shape \[4, 10, 1, 1\], not logits"):
            hc.evaluate(snn, images(), ann=ann)


def test_models_returning_more_than_logits_or_untraceable_without_relu_modules():
    class Pair(ConvHead):
        def forward(self, x):
            features = torch.relu(self.conv(x)).mean((2, 3))
            return self.fc(features), features

    class Branching(Pair):
        def forward(self, x):
            h = torch.relu(self.conv(x))
            return self.fc((h if x.mean() > -100 else -h).mean((2, 3)))  # a branch on values: fx cannot trace

    class BranchingPair(Pair):  # fx cannot trace it: module swapping, whose first batch is a probe
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU()

        def forward(self, x):
            features = self.relu(self.conv(x) if x.mean() > -100 else -self.conv(x)).mean((2, 3))
            return self.fc(features), features

    with pytest.raises(TypeError, match="Pair returns tuple, not a tensor of logits"):
        hc.convert(Pair().eval(), images())
    with pytest.raises(TypeError, match="BranchingPair returns tuple, not a tensor of logits"):
        hc.convert(BranchingPair().eval(), images(batches=1))
    with pytest.raises(ValueError, match=r"Branching: torch.fx cannot trace it \(TraceError.*only ReLU modules "
                                         r"\(nn.ReLU, ReLU6, Hardtanh\(0, c\)\) become neurons.*it has none"):
        hc.convert(Branching().eval(), images())


def test_in_place_relu_on_a_view_of_a_tensor_read_later_is_a_clear_error():
    class HalfRectified(ConvHead):
        def forward(self, x):
            h = self.conv(x)
            h[:, :2].relu_()  # rectifies half of h's channels, in h
            return self.fc(torch.relu(h).mean((2, 3)))

    with pytest.raises(ValueError, match="an in-place ReLU .* writes into getitem, a view of conv, which is read"):
        hc.convert(HalfRectified().eval(), images())


def test_write_through_out_into_a_view_of_a_tensor_read_later_is_a_clear_error():
    class HalfScaled(ConvHead):
        def forward(self, x):
            h = torch.relu(self.conv(x))
            torch.mul(h[:, :2], 2.0, out=h[:, 2:])  # overwrites half of h's channels, in h
            return self.fc(h.mean((2, 3)))

    with pytest.raises(ValueError, match=r"an in-place write \(out=\) .* writes into getitem_1, a view of relu_1, which "
                                         r"is read afterwards.*use the call's result instead of out="):
        hc.convert(HalfScaled().eval(), images())


def test_reduction_over_the_batch_after_the_neurons_is_a_clear_error():
    class BatchCentred(ConvHead):
        def forward(self, x):
            h = torch.relu(self.conv(x))
            return self.fc((h - h.mean(0, keepdim=True)).mean((2, 3)))

    with pytest.raises(ValueError, match="graph node 'mean'.*reduces over the batch dim .* folds the time steps"):
        hc.convert(BatchCentred().eval(), images())


@pytest.mark.parametrize("after_relu", [False, True])
def test_tokens_first_activations_at_neurons_are_a_clear_error(after_relu):
    """Tokens first, ``[N, B, C]``: the SNN would fold the steps into the tokens (a ToTime at the
    analog residual, or a neuron unfolding dim 0), which gave wrong logits of the wrong shape."""
    class TokensFirst(ConvHead):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))

        def forward(self, x):
            h = self.conv(x)
            h = (torch.relu(h) if after_relu else h).flatten(2).permute(2, 0, 1)
            return self.fc((h + self.mlp(h)).mean(0))

    node = "mlp.1" if after_relu else "add"
    with pytest.raises(ValueError, match=rf"graph node '{node}'\): it reads .* dim\(s\) \[1\] change with the batch "
                                         rf"size, but only dim 0 may: the SNN folds the time steps into dim 0"):
        hc.convert(TokensFirst().eval(), images())


@pytest.mark.parametrize("call,node,what", [
    (lambda h, B: torch.cat([h, h.flip(3)], 0), "cat", "moves rows along"),
    (lambda h, B: sum(h.chunk(2, 0)), "chunk", "moves rows along"),
    (lambda h, B: h[:B], "getitem", "moves rows along"),
    (lambda h, B: h.roll(1, 0), "roll", "moves rows along"), (lambda h, B: h.flip(0), "flip", "moves rows along"),
    (lambda h, B: h.cumsum(0), "cumsum", "moves rows along"),
    (lambda h, B: torch.cumsum(h, dim=-4), "cumsum", "moves rows along"),
    (lambda h, B: h.view(2, -1, 4, 8, 8).mean(0), "view", "splits")])
def test_moving_rows_along_the_batch_after_the_neurons_is_a_clear_error(call, node, what):
    """Test-time augmentation (a flipped copy of each image) and the like undone after a neuron: the
    SNN's rows there are steps and samples, so these mixed steps (the next neuron integrated other
    steps' inputs) without a word."""
    class RowsMoved(ConvHead):
        def forward(self, x):
            h = torch.relu(self.conv(torch.cat([x, x.flip(3)], 0)))
            return self.fc(torch.relu(call(h, x.shape[0])).mean((2, 3)))

    with pytest.raises(ValueError, match=rf"graph node '{node}(_1)?'\): it {what} the batch dim of an activation "
                                         rf"after the neurons, and the SNN folds the time steps into that dim"):
        hc.convert(RowsMoved().eval(), images())


def test_weight_norm_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(1, 4, 3, padding=1)), nn.BatchNorm2d(4),
                          nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)).eval()
    x = images()[0][0]
    before = model(x)
    snn = hc.convert(model, images(), n=8, T=64, policy="max")
    assert torch.equal(model(x), before) and nn.utils.parametrize.is_parametrized(model[0])  # untouched
    assert (snn(x).mean(0) - before).abs().max() < 0.02 * before.abs().max()
    with pytest.warns(FutureWarning):
        legacy = nn.Sequential(nn.utils.weight_norm(nn.Conv2d(1, 4, 3, padding=1)), nn.ReLU(), nn.Flatten(),
                               nn.Linear(256, 10)).eval()
    with pytest.raises(ValueError, match="call torch.nn.utils.remove_weight_norm on its layers first"):
        hc.convert(legacy, images())


def test_max_pooling_with_indices_after_neurons_is_a_clear_error():
    class Pooled(ConvHead):
        def __init__(self):
            super().__init__()
            self.pool = nn.MaxPool2d(2, return_indices=True)

        def forward(self, x):
            pooled, indices = self.pool(torch.relu(self.conv(x)))
            return self.fc(pooled.mean((2, 3)))

    with pytest.raises(ValueError, match=r"cannot convert <root> \(MaxPool2d module 'pool'.*it returns indices"):
        hc.convert(Pooled().eval(), images())


def test_max_batches_takes_no_more_from_the_loader(snn):
    batches = iter(images(batches=3))
    assert hc.evaluate(snn, batches, max_batches=2).samples == 8
    assert next(batches)[0].shape[0] == 4 and next(batches, None) is None  # the third batch is still there
    for bad in (0, True):
        with pytest.raises(ValueError, match="max_batches must be a positive integer"):
            hc.evaluate(snn, images(), max_batches=bad)


@pytest.mark.parametrize("T", [0, -3])
def test_T_zero_or_negative(snn, T, capsys):
    with pytest.raises(ValueError, match="T must be a positive integer"):
        hc.convert(cnn(), images(), T=T)
    with pytest.raises(ValueError, match=r"T \(time steps\) must be a positive integer"):
        hc.evaluate(snn, images(), T=T)
    one_line_error(*cli(["evaluate", "--model", "vgg_small", "--T", str(T)], capsys), "--T must be at least 1")


@pytest.mark.parametrize("n", [0, 17])
def test_n_out_of_range(n, capsys):
    with pytest.raises(ValueError, match=r"n .*must be"):
        hc.convert(cnn(), images(), n=n)
    text = "--n must be in 1..16" if n else "--n must be at least 1"
    one_line_error(*cli(["evaluate", "--model", "vgg_small", "--n", str(n)], capsys), text)


def test_negative_workers(capsys):
    one_line_error(*cli(["evaluate", "--model", "vgg_small", "--workers", "-1"], capsys),
                   "--workers must be at least 0, got -1")


def test_unknown_policy_or_neuron(capsys):
    with pytest.raises(ValueError, match="unknown threshold policy 'best'"):
        hc.convert(cnn(), images(), policy="best")
    with pytest.raises(ValueError, match="neuron must be one of"):
        hc.convert(cnn(), images(), neuron="lif")
    one_line_error(*cli(["evaluate", "--model", "vgg_small", "--policy", "best"], capsys),
                   "unknown threshold policy 'best'")
    one_line_error(*cli(["evaluate", "--model", "vgg_small", "--policy", "opt,*.mix_in0"], capsys),
                   "'*.mix_in0' is not PATTERN=POLICY")
    one_line_error(*cli(["evaluate", "--model", "vgg_small", "--neuron", "lif"], capsys), "invalid choice: 'lif'")
    with pytest.raises(ValueError, match=r"starts with the override '\*=999'; .* e\.g\. 'opt,\*=999'"):
        hc.convert(cnn(), images(), policy="*=999")
    with pytest.raises(ValueError, match="the policy \"999\", a string"):
        hc.convert(cnn(), images(), policy=999)


def test_mismatched_image_size_or_channels(snn, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"cannot run calibration batch 0 of shape \[4, 3, 8, 8\]"):
        hc.convert(cnn(), images(shape=(3, 8, 8)))
    with pytest.raises(ValueError, match=r"images of shape \[1, 16, 16\] but the SNN was calibrated on \[1, 8, 8\]"):
        hc.evaluate(snn, images(shape=(1, 16, 16)))
    with pytest.raises(ValueError, match=r"images of shape \[1, 16, 16\] .*, but the SNN was calibrated on "
                                         r"\[1, 8, 8\]; convert again"):
        snn(images(shape=(1, 16, 16))[0][0])
    with pytest.raises(ValueError, match=r"images of shape \[8, 8\] \(a batch of shape \[1, 8, 8\]\), .*; "
                                         r"add the batch dim"):
        snn(images()[0][0][0])
    rgb = tmp_path / "rgb.pt"
    torch.save(cnn(channels=3), rgb)
    one_line_error(*cli(["evaluate", "--model", str(rgb), *QUICK], capsys), "expects 3-channel images")


def test_model_with_nothing_to_convert(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"has no ReLU \(nor ReLU6"):
        hc.convert(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval(), images())
    linear = tmp_path / "linear.pt"
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval(), linear)
    one_line_error(*cli(["evaluate", "--model", str(linear), *QUICK], capsys), "has no ReLU (nor ReLU6")


def test_model_in_training_mode_is_converted_in_eval_mode_with_a_note():
    model = cnn().train()
    with pytest.warns(UserWarning, match="was in training mode; converting it in eval mode"):
        snn = hc.convert(model, images())
    assert model.training  # the user's model is left as it was
    with pytest.warns(UserWarning, match="evaluating it in eval mode"):
        hc.evaluate(snn, images(), ann=model)
    assert model.training  # and left so again
    model[2].eval()  # one layer frozen in eval mode (a fine-tuned model's BatchNorm), its mode kept too
    modes = [m.training for m in model.modules()]
    with pytest.warns(UserWarning, match="is in training mode; evaluating it in eval mode"):
        hc.evaluate(snn, images(), ann=model)
    assert [m.training for m in model.modules()] == modes
    model.eval()[5].train()  # one layer in training mode: the whole ANN evaluated in eval mode
    with pytest.warns(UserWarning, match="is partly in training mode; evaluating it in eval mode"):
        hc.evaluate(snn, images(), ann=model)
    assert not model.training and model[5].training


def test_a_forward_that_needs_more_than_the_images_is_refused_at_once():
    """It traced into a graph of two inputs and failed in calibration with forward's TypeError."""
    class TwoInputs(ConvHead):
        def forward(self, x, scale, *, shift):
            return self.fc(torch.relu(self.conv(x * scale + shift)).mean((2, 3)))

    class Defaults(ConvHead):
        def forward(self, x, scale=1.0, *args, shift=0.0, **options):
            return self.fc(torch.relu(self.conv(x * scale + shift)).mean((2, 3)))

    def supplies_scale(forward):
        @functools.wraps(forward)
        def wrapper(self, x):
            return forward(self, x, 1.0)
        return wrapper

    class Decorated(ConvHead):  # (fx cannot trace it: module swapping)
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU()

        @supplies_scale
        def forward(self, x, scale):  # (inspect.signature follows __wrapped__ to this one by default)
            return self.fc(self.relu(self.conv(x * scale)).mean((2, 3)))

    class KeywordOnly(ConvHead):
        def forward(self, *, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    class Variadic(ConvHead):
        def forward(self, *inputs):
            return self.fc(torch.relu(self.conv(inputs[0])).mean((2, 3)))

    with pytest.raises(TypeError, match=r"TwoInputs.forward needs scale, shift besides the images; .* wrap it"):
        hc.convert(TwoInputs().eval(), images())
    for model, signature in ((KeywordOnly(), r"\(\*, x\)"), (Variadic(), r"\(\*inputs\)")):
        with pytest.raises(TypeError, match=rf"{type(model).__name__}.forward{signature} takes no images as its first "
                                            rf"argument; .* wrap it"):
            hc.convert(model.eval(), images())

    class NoGrad(ConvHead):  # a decorator passing *args on
        @torch.no_grad()
        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    assert hc.convert(NoGrad().eval(), images(), T=2).report.traced
    assert hc.convert(Defaults().eval(), images(), T=2).report.traced
    hc.convert(Decorated().eval(), images(), T=2)


def test_a_model_with_forward_hooks_gets_a_note():
    model = cnn()
    model[1].register_forward_hook(lambda m, a, out: None)
    with pytest.warns(UserWarning, match=r"forward hooks on 1 do not run as hooks: .* on the ReLU, attention and "
                                         r"max-pooling modules the conversion replaces, dropped"):
        hc.convert(model, images())


def test_inputs_of_another_dtype_or_device_are_moved_to_the_model(snn):
    as_double = [(x.double(), y) for x, y in images()]
    assert hc.evaluate(snn, as_double).to_dict() == hc.evaluate(snn, images()).to_dict()
    double = hc.convert(cnn().double(), images(), T=2)  # a float64 model: float32 images are moved to it
    assert double(images()[0][0].double()).dtype == torch.float64 and hc.evaluate(double, images()).samples == 8
    with pytest.raises(TypeError, match="torch.uint8 images; convert them to float"):
        hc.evaluate(snn, [((x * 255).to(torch.uint8), y) for x, y in images()])
    if torch.cuda.is_available():
        on_gpu = hc.convert(cnn().cuda(), images(), T=2)  # CPU batches, CUDA model
        assert hc.evaluate(on_gpu, images()).samples == 8


def test_an_ann_of_another_dtype_than_the_snn_gets_the_images_in_its_own(snn):
    data = [(x, cnn()(x).argmax(1)) for x, _ in images()]  # labels the ANN gets right
    expected = hc.evaluate(snn, data, ann=cnn()).to_dict()
    assert expected["ann_accuracy"] == 100.0
    for ann in (cnn().double(), cnn().to(torch.bfloat16)):
        result = hc.evaluate(snn, data, ann=ann).to_dict()
        assert result["ann_accuracy"] == 100.0 and result["snn_accuracy"] == expected["snn_accuracy"]
    double = hc.convert(cnn().double(), data, T=2)  # a float64 SNN, a float32 ANN
    assert hc.evaluate(double, data, ann=cnn()).ann_accuracy == 100.0


def test_a_prepared_model_or_an_snn_as_the_ann_is_a_clear_error(snn):
    prepared = hc.calibrate(hc.prepare(cnn()), images())
    counts = [site.observer.count.item() for site in hc.api.observed_sites(prepared).values()]
    for ann, kind in ((prepared, "prepared"), (snn, "converted")):
        with pytest.raises(TypeError, match=f"ann= expects the float model .*, got a {kind} "):
            hc.evaluate(snn, images(seed=1), ann=ann)
    assert [site.observer.count.item() for site in hc.api.observed_sites(prepared).values()] == counts


def test_what_is_no_model_or_no_loader_is_named_as_such(snn):
    x = images()[0][0]
    for call, message in ((lambda: hc.convert(cnn(), x), "convert: the loader must yield .* got a Tensor: wrap a "
                           r"tensor of images as \[\(images, labels\)\]"),
                          (lambda: hc.convert(cnn(), 5), "convert: the loader must yield .* got a int"),
                          (lambda: hc.evaluate(snn, "data"), "evaluate: the loader must yield .* got a str"),
                          (lambda: hc.convert(5, images()), "expected a torch.nn.Module, got int"),
                          (lambda: hc.evaluate(snn, images(), ann="x"), "expected a torch.nn.Module, got str"),
                          (lambda: hc.convert(cnn(), images(), communicate="no"), "communicate must be True or False")):
        with pytest.raises(TypeError, match=message):
            call()


def test_an_empty_calibration_batch_is_skipped():
    """Was an IndexError from the observers' amax (and a var_mean warning)."""
    data = images()
    empty = [(data[0][0][:0], data[0][1][:0])]
    torch.testing.assert_close(hc.convert(cnn(), empty + data, T=2)(data[0][0]), hc.convert(cnn(), data, T=2)(data[0][0]))


def test_an_ann_with_other_outputs_than_the_snn_is_a_clear_error(snn):
    """Was 0 % ANN accuracy and agreement, silently."""
    other = nn.Sequential(*list(cnn())[:-1], nn.Linear(4 * 64, 5)).eval()
    with pytest.raises(ValueError, match=r"the ANN Sequential gives logits of shape \[4, 5\], the SNN \[4, 10\]"):
        hc.evaluate(snn, images(seed=1), ann=other)


def test_cli_missing_model_and_unknown_dataset(capsys):
    one_line_error(*cli(["evaluate", "--model", "missing.pt"], capsys), "is not a file")
    one_line_error(*cli(["evaluate", "--model", "vgg_small", "--dataset", "nope"], capsys), "unknown dataset 'nope'")


def test_unwritable_output_path(model_file, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    one_line_error(*cli(["evaluate", "--model", model_file, *QUICK, "--json", str(blocker / "r.json")], capsys),
                   "error: cannot write")


def test_a_failed_command_leaves_no_folders_and_a_run_makes_them(model_file, tmp_path, capsys):
    one_line_error(*cli(["evaluate", "--model", str(tmp_path / "missing.pt"), *QUICK, "--json",
                         str(tmp_path / "new" / "deep" / "r.json")], capsys), "is not a file")
    assert not (tmp_path / "new").exists()  # (checking the path made its folders, and a failure left them)
    assert main(["evaluate", "--model", model_file, *QUICK, "--json", str(tmp_path / "new" / "deep" / "r.json"),
                 "--no-progress"]) == 0
    assert (tmp_path / "new" / "deep" / "r.json").is_file()


def test_an_output_over_an_input_file_or_another_output_is_refused(model_file, tmp_path, capsys):
    """--out or --json on the --model file, --json and --plot on one path: refused before the run,
    the model file untouched (it was overwritten, and the model lost)."""
    before = Path(model_file).read_bytes()
    one_line_error(*cli(["convert", "--model", model_file, *QUICK, "--out", model_file], capsys),
                   f"--out {model_file} is the --model file: writing it would destroy that")
    one_line_error(*cli(["evaluate", "--model", model_file, *QUICK, "--json", model_file], capsys),
                   f"--json {model_file} is the --model file")
    same = str(tmp_path / "r.png")
    one_line_error(*cli(["evaluate", "--model", model_file, *QUICK, "--json", same, "--plot", same], capsys),
                   f"--plot {same} is where --json goes")
    assert Path(model_file).read_bytes() == before and not Path(same).exists()


@pytest.mark.parametrize("command, option, name, text", [
    ("evaluate", "--plot", "out.txt", "matplotlib cannot write .txt files"),
    ("evaluate", "--json", "adir", "adir: it is a directory"),
    ("evaluate", "--plot", "adir", "adir: it is a directory"),
    ("convert", "--out", "adir", "adir: it is a directory"),
])
def test_bad_output_paths_fail_before_the_run(command, option, name, text, tmp_path, capsys, monkeypatch):
    def run_started(*args, **kwargs):
        raise AssertionError("the run started before the output path was checked")

    monkeypatch.setattr(importlib.import_module(f"hmtconv.cli.{command}"), "load_workload", run_started)
    (tmp_path / "adir").mkdir()
    one_line_error(*cli([command, "--model", "vgg_small", *QUICK, option, str(tmp_path / name)], capsys), text)


def test_disk_full_keeps_the_previous_results_file(model_file, tmp_path, capsys, monkeypatch):
    previous = tmp_path / "r.json"
    previous.write_text('{"previous": true}\n')

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report_io.os, "fsync", full)
    one_line_error(*cli(["evaluate", "--model", model_file, *QUICK, "--json", str(previous)], capsys),
                   "No space left on device")
    assert previous.read_text() == '{"previous": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind


def test_same_command_and_seed_give_identical_json(model_file, tmp_path, capsys):
    runs = []
    for _ in range(2):
        assert main(["evaluate", "--model", model_file, *QUICK, "--json", str(tmp_path / "r.json")]) == 0
        record = json.loads((tmp_path / "r.json").read_text())
        del record["seconds"], record["provenance"]["timestamp"]
        runs.append(record)
    assert runs[0] == runs[1]


def test_unexpected_library_errors_are_one_line_but_bugs_keep_their_traceback(monkeypatch, capsys):
    import hmtconv.cli.evaluate as command

    monkeypatch.setattr(command, "run_evaluation", lambda args: {}.pop("missing"))  # a genuine bug
    with pytest.raises(KeyError):
        main(["evaluate", "--model", "vgg_small"])
    monkeypatch.setenv("HMTCONV_DEBUG", "1")
    monkeypatch.setattr(command, "run_evaluation", lambda args: hc.evaluate(object(), []))
    status, err = cli(["evaluate", "--model", "vgg_small"], capsys)
    assert status == 2 and "Traceback" in err and err.endswith("hmtconv: error: evaluate expects the SNN returned "
                                                               "by hmtconv.convert(), got object\n")


def test_one_relu_module_at_two_sizes_in_an_untraceable_model():
    """Module swapping gives each call of a ReLU module that a zero image of the example's size
    shows a site of its own (convert passes the first calibration batch); prepared without an
    example, the calls share one site, which cannot observe two sizes: named."""
    class TwoSizes(ConvHead):
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU()

        def forward(self, x):
            h = self.relu(self.conv(x)) if x.mean() > -100 else x  # a branch on values: fx cannot trace
            return self.fc(self.relu(h.mean((2, 3))))

    snn = hc.convert(TwoSizes().eval(), images())
    assert not snn.report.traced and list(snn.sites()) == ["relu.0", "relu.1"]
    with pytest.raises(ValueError, match=r"relu saw per-sample shape \(4,\) after \(4, 8, 8\): .* prepare gives "
                                         r"it a site per call that a zero image of example_inputs' size makes; .* "
                                         r"give each call a module of its own"):
        hc.calibrate(hc.prepare(TwoSizes().eval()), images())


@pytest.mark.parametrize("argv, text", [(["--T", "0"], "--T must be at least 1"),
                                        (["--n", "4", "17"], "--n must be in 1..16"),
                                        (["--policy", "opt", "best"], "unknown threshold policy 'best'"),
                                        (["--limit", "0"], "--limit must be at least 1"),
                                        (["--epochs", "0"], "--epochs must be at least 1"),
                                        (["--out", __file__], "cannot write")])
def test_demo_options_are_errors_before_training(argv, text, capsys, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained with a bad option")
    monkeypatch.setattr("hmtconv.cli.demo.trained_model", no_training)
    one_line_error(*cli(["demo", *argv], capsys), text)


@pytest.mark.parametrize("argv, text", [(["--max-batch", "0"], "argument --max-batch: --max-batch must be at least 1"),
                                        (["--memory-budget", "4 apples"],
                                         "argument --memory-budget: cannot read memory size '4 apples'")])
def test_chunk_options_are_checked_before_the_model_loads(argv, text, capsys, monkeypatch):
    monkeypatch.setattr("hmtconv.cli.evaluate.load_workload", lambda *a, **k: pytest.fail("loaded the model"))
    one_line_error(*cli(["evaluate", "--model", "vgg_small", *argv], capsys), text)


@pytest.mark.parametrize("call,node", [(lambda h: h.t(), "t"), (lambda h: torch.t(h), "t"),
                                       (lambda h: h.T, "getattr_1"), (lambda h: h.mT, "getattr_1"),
                                       (lambda h: h.adjoint(), "adjoint")])
def test_a_transpose_that_moves_the_batch_dim_to_the_output_is_a_clear_error(call, node):
    """``x.t()`` of a 2-d ``[B, F]`` activation puts the batch (and the SNN's steps) in dim 1."""
    class Swapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8 * 8, 3)

        def forward(self, x):
            return call(self.fc(torch.relu(x.flatten(1))))

    with pytest.raises(ValueError, match=rf"the model's output: it reads {node} \(made in <root>, shape \[3, 1\] at "
                                         rf"batch 1\), .* dim\(s\) \[1\] change .* x.t\(\), x.T and x.mT of a 2-d"):
        hc.convert(Swapped().eval(), images())


def test_a_relu_of_one_value_per_sample_is_named():
    class PerSample(ConvHead):
        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3))) * torch.relu(x.sum((1, 2, 3)))[:, None]

    with pytest.raises(ValueError, match=r"relu expects a batched activation \[B, features...\], got shape \(\d+,\): "
                                         r"keep a feature dim"):
        hc.convert(PerSample().eval(), images())


def test_numpy_integers_are_integers():
    import numpy as np

    from hmtconv import HMTNeuron
    snn = hc.convert(cnn(), images(), n=np.int64(4), T=np.int32(2))
    assert (snn.config.n, snn.config.T) == (4, 2) and type(snn.config.T) is int
    assert HMTNeuron(np.int64(3), 0.5).n == 3
    with pytest.raises(ValueError, match=r"n \(number of thresholds\) must be an integer in \[1, 16\], got 4.0"):
        HMTNeuron(4.0, 0.5)


def test_a_prepared_model_converted_in_place_is_named_as_such():
    """It is the SNN's network then: it was asked for calibration data "for a float model"."""
    prepared = hc.calibrate(hc.prepare(cnn()), images())
    snn = hc.convert(prepared, T=2, policy="max", inplace=True)
    with pytest.raises(ValueError, match=r"holds spiking neurons: it was converted in place already"):
        hc.convert(prepared, T=2)
    with pytest.raises(TypeError, match="got an already converted SNN"):
        hc.convert(snn, images())
