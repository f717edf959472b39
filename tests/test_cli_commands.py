"""``hmtconv evaluate``, ``convert``, ``sweep`` and ``demo`` end to end on real MNIST, tiny sizes."""
import json
import re

import pytest
import torch
from torch import nn

import hmtconv.cli.demo
from hmtconv.cli import main
from hmtconv.report import read_jsonl

SMALL = ["--dataset", "mnist", "--limit", "48", "--calib-size", "32", "--batch-size", "16"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A barely trained vgg_small checkpoint (the plumbing, not the accuracy, is under test)."""
    path = tmp_path_factory.mktemp("ckpt") / "vgg.pt"
    assert main(["train", "--epochs", "1", "--limit", "3", "--batch-size", "32", "--no-progress",
                 "--out", str(path)]) == 0
    return path


def test_train_logs_a_line_per_epoch_where_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    losses, real = [], torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy",
                        lambda *a, **k: (lambda loss: losses.append(loss.item()) or loss)(real(*a, **k)))
    assert main(["train", "--epochs", "2", "--limit", "2", "--batch-size", "16", "--out", str(tmp_path / "m.pt")]) == 0
    log = capsys.readouterr().err
    means = [float(m) for m in re.findall(r"epoch \d/2: mean loss (\d\.\d{4})\n", log)]
    assert "\r" not in log and len(losses) == 4, log
    assert means == pytest.approx([sum(losses[:2]) / 2, sum(losses[2:]) / 2], abs=1e-4)


def test_evaluate_writes_json_with_every_step_and_plots(checkpoint, tmp_path, capsys):
    out = tmp_path / "out.json"
    plot = tmp_path / "curves.png"
    assert main(["evaluate", "--model", str(checkpoint), *SMALL, "--n", "4", "--T", "3", "--policy", "opt",
                 "--json", str(out), "--plot", str(plot)]) == 0
    record = json.loads(out.read_text())
    assert 0 <= record["ann_accuracy"] <= 100
    assert len(record["snn_accuracy"]) == 3 and len(record["energy_ratio"]) == 3
    assert record["energy_ratio"] == sorted(record["energy_ratio"])  # energy grows with t
    assert record["config"] == {"n": 4, "T": 3, "policy": "opt", "neuron": "hmt", "identity": "none",
                                "communicate": True, "granularity": "layer"}
    assert record["provenance"]["versions"]["torch"] == torch.__version__
    assert plot.read_bytes()[:4] == b"\x89PNG" and (tmp_path / "curves-layers.png").exists()
    seconds = record["seconds"]
    assert set(seconds) == {"convert", "evaluate", "ann_forward", "simulation", "diagnostics"}
    assert all(value > 0 for value in seconds.values())
    printed = capsys.readouterr().out
    ratio = seconds["simulation"] / (3 * seconds["ann_forward"])
    assert "t=3" in printed and "firing rate" in printed and f"= {ratio:.2f} x T ANN forward passes" in printed


def test_evaluate_takes_a_whole_pickled_module_with_a_warning(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 13 * 13, 10))
    path = tmp_path / "model.pt"
    torch.save(model, path)
    out = tmp_path / "out.json"
    assert main(["evaluate", "--model", str(path), *SMALL, "--T", "2", "--json", str(out)]) == 0
    assert "pickled" in capsys.readouterr().err
    assert len(json.loads(out.read_text())["snn_accuracy"]) == 2
    assert main(["evaluate", "--model", str(path), *SMALL, "--no-pickle"]) == 2
    assert "pickle" in capsys.readouterr().err


def test_convert_then_evaluate_snn_reproduces_the_numbers(checkpoint, tmp_path):
    snn_file = tmp_path / "snn.safetensors"
    args = [*SMALL, "--n", "4", "--T", "2", "--policy", "999", "--granularity", "channel"]
    assert main(["convert", "--model", str(checkpoint), *args, "--out", str(snn_file)]) == 0
    direct, loaded = tmp_path / "direct.json", tmp_path / "loaded.json"
    assert main(["evaluate", "--model", str(checkpoint), *args, "--json", str(direct)]) == 0
    # the reloaded SNN, simulated in chunks under a memory budget: the same numbers
    assert main(["evaluate", "--snn", str(snn_file), *SMALL, "--memory-budget", "200KB", "--json", str(loaded)]) == 0
    a, b = json.loads(direct.read_text()), json.loads(loaded.read_text())
    for key in ("ann_accuracy", "snn_accuracy", "agreement", "energy_ratio", "spikes_per_sample", "config"):
        assert a[key] == b[key], key


@pytest.fixture(scope="module")
def random_snn(tmp_path_factory):
    """vgg_small without weights (a random network), converted at T = 2."""
    path = tmp_path_factory.mktemp("snn") / "snn.safetensors"
    assert main(["convert", "--model", "vgg_small", *SMALL, "--T", "2", "--out", str(path)]) == 0
    return path


def test_evaluate_snn_of_a_random_network_compares_with_the_ann_it_was_converted_from(random_snn, tmp_path, capsys):
    """Rebuilding vgg_small without weights gives another random network: the SNN's ANN mode stands in."""
    direct, loaded = tmp_path / "direct.json", tmp_path / "loaded.json"
    assert main(["evaluate", "--model", "vgg_small", *SMALL, "--T", "2", "--json", str(direct)]) == 0
    assert main(["evaluate", "--snn", str(random_snn), *SMALL, "--json", str(loaded)]) == 0
    a, b = json.loads(direct.read_text()), json.loads(loaded.read_text())
    for key in ("ann_accuracy", "agreement", "snn_accuracy", "per_layer"):
        assert a[key] == b[key], key
    assert "(its ANN mode)" in capsys.readouterr().err


def test_evaluate_snn_warns_of_conversion_options_and_records_the_files(random_snn, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["evaluate", "--snn", str(random_snn), *SMALL, "--n", "8", "--policy", "999", "--no-communicate",
                 "--granularity", "layer", "--calib-size", "100000", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "calibrating on all" not in err  # the file has its thresholds: no calibration images are drawn
    warning = [line for line in err.splitlines() if line.startswith("hmtconv: warning:")]
    assert warning == ["hmtconv: warning: --n 8, --policy 999, --no-communicate ignored: the SNN file fixes the "
                       "conversion (hmt n=4 T=2 opt); convert again to change it"]
    config = json.loads(out.read_text())["provenance"]["config"]
    assert (config["n"], config["policy"], config["communicate"]) == (4, "opt", True)


def test_convert_says_and_records_how_many_images_it_calibrated_on(tmp_path, capsys):
    out = tmp_path / "snn.safetensors"
    assert main(["convert", "--model", "resnet18_small", "--dataset", "fake", "--calib-size", "100000", "--T", "2",
                 "--batch-size", "256", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "--calib-size 100000 is more than the train split's 512 images" in captured.err
    assert "thresholds from 512 train images" in captured.out
    from hmtconv.snn_io import read_snn_file
    assert read_snn_file(out)[0]["extra"]["calib_size"] == 512


def test_sweep_runs_the_grid_once_and_resumes(checkpoint, tmp_path, capsys):
    config = tmp_path / "sweep.toml"
    config.write_text(f"""
out = "{tmp_path / 'sweep'}"
[data]
dataset = "mnist"
limit = 32
calib_size = 32
batch_size = 16
[[models]]
name = "vgg"
model = "{checkpoint}"
[grid]
n = [2, 4]
T = [2]
policy = ["opt", "999"]
""")
    assert main(["sweep", str(config)]) == 0
    log = capsys.readouterr().err  # stderr is not a terminal: a line per simulation, no bar
    assert "\r" not in log and "sweep: 4/4: vgg n=4 policy=999" in log and "SNN" in log, log
    records = read_jsonl(tmp_path / "sweep" / "results.jsonl")
    assert len(records) == 4 and {(r["n"], r["policy"]) for r in records} == {(2, "opt"), (2, "999"), (4, "opt"), (4, "999")}
    table = (tmp_path / "sweep" / "table.md").read_text()
    assert "| vgg" in table and (tmp_path / "sweep" / "curves-vgg.png").exists()
    assert main(["sweep", str(config), "--no-progress"]) == 0  # resume: nothing left to do
    assert len(read_jsonl(tmp_path / "sweep" / "results.jsonl")) == 4


def test_sweep_config_typos_are_errors(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('[[models]]\nmodel = "x"\n[grid]\npolicies = ["opt"]\n')
    assert main(["sweep", str(config)]) == 2
    assert "unknown key(s) policies" in capsys.readouterr().err


def test_a_sweep_configs_device_is_named_as_the_configs_key(tmp_path, capsys):
    config = tmp_path / "sweep.toml"
    config.write_text('device = "nope"\n[[models]]\nmodel = "vgg_small"\n')
    assert main(["sweep", str(config)]) == 2
    assert capsys.readouterr().err == f"hmtconv: error: {config}: device = 'nope' is not a device name (cpu, cuda, " \
                                      "cuda:1, auto)\n"  # (not --device, an option not given)
    assert main(["sweep", str(config), "--device", "nope"]) == 2
    assert capsys.readouterr().err.startswith("hmtconv: error: --device 'nope' is not a device name")


def test_a_sweep_models_error_names_its_entry(checkpoint, tmp_path, capsys):
    config = tmp_path / "sweep.toml"
    entries = f'[[models]]\nname = "ok"\nmodel = "{checkpoint}"\n[[models]]\nname = "bad"\nmodel = "nope.pt"\n'
    config.write_text(f'out = "{tmp_path / "out"}"\n[data]\nlimit = 16\ncalib_size = 16\n{entries}[grid]\nT = [1]\n')
    assert main(["sweep", str(config), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("hmtconv: error: [[models]] 'bad': model 'nope.pt' is not a file")
    five = tmp_path / "five.pt"  # a model that does not fit the data: named as the config's key, not --model
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 5)).eval(), five)
    config.write_text(f'out = "{tmp_path / "out"}"\n[data]\nlimit = 16\ncalib_size = 16\n[[models]]\nname = "bad"\n'
                      f'model = "{five}"\n[grid]\nT = [1]\n')
    assert main(["sweep", str(config), "--no-progress"]) == 2
    assert f"hmtconv: error: [[models]] 'bad': model = {five} outputs 5 classes" in capsys.readouterr().err


def test_a_sweep_log_counts_every_point_one_simulation_answers(checkpoint, tmp_path, capsys):
    config = tmp_path / "sweep.toml"
    config.write_text(f'out = "{tmp_path / "out"}"\n[data]\nlimit = 16\ncalib_size = 16\n[[models]]\nname = "m"\n'
                      f'model = "{checkpoint}"\n[grid]\nT = [1, 2, 3]\npolicy = ["999"]\n')
    assert main(["sweep", str(config)]) == 0
    assert "sweep: 3/3: m n=4 policy=999" in capsys.readouterr().err  # (one 3-step run for T = 1, 2, 3)


def test_sweep_into_an_unwritable_folder_is_an_error_before_any_point(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("hmtconv.sweep.load_workload", lambda *a, **k: pytest.fail("loaded the model"))
    config = tmp_path / "sweep.toml"
    config.write_text('[[models]]\nmodel = "vgg_small"\n')
    (tmp_path / "file").touch()
    assert main(["sweep", str(config), "--out", str(tmp_path / "file" / "out")]) == 2
    assert f"cannot write {tmp_path / 'file' / 'out' / 'results.jsonl'}" in capsys.readouterr().err


def test_demo_runs_on_a_cached_model(checkpoint, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "vgg_small-mnist-e1-s0.pt").write_bytes(checkpoint.read_bytes())
    monkeypatch.setenv("HMTCONV_CACHE", str(cache))
    titles = []
    plot_tradeoff = hmtconv.cli.demo.plot_tradeoff
    monkeypatch.setattr(hmtconv.cli.demo, "plot_tradeoff", lambda *a, title: titles.append(title) or
                        plot_tradeoff(*a, title=title))
    assert main(["demo", "--epochs", "1", "--limit", "48", "--T", "2", "--n", "4", "--policy", "opt", "999",
                 "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert [r["config"]["policy"] for r in results["runs"]] == ["opt", "999"]
    assert all(len(r["snn_accuracy"]) == 2 for r in results["runs"])
    for r in results["runs"]:  # opt's figures at each T all come from that T's own conversion
        macs = r["macs"]
        for T, (energy, synops) in enumerate(zip(r["energy_ratio"], r["synops_cumulative"]), 1):
            assert energy == pytest.approx((4.6 * (macs["static"] + T * macs["per_step"]) + 0.9 * synops)
                                           / (4.6 * macs["ann"]), rel=1e-12)
    for name in ("curves.png", "layers.png", "tradeoff.png"):
        assert (tmp_path / "demo" / name).exists()
    assert "T=2" in capsys.readouterr().out
    assert titles == ["Accuracy vs energy ratio over T = 1..2"]  # (the --T given, not 8)


def test_an_unknown_option_is_named_by_the_parser_that_lists_the_options(capsys):
    for argv, said in ((["evaluate", "--bogus"], "hmtconv evaluate: error: unrecognized arguments: --bogus (see "
                        "hmtconv evaluate --help)\n"),
                       (["--bogus", "train"], "hmtconv: error: unrecognized arguments: --bogus (see hmtconv --help)\n")):
        with pytest.raises(SystemExit) as exit:  # (argparse's errors exit)
            main(argv)
        assert exit.value.code == 2 and capsys.readouterr().err == said


def test_a_library_warning_that_names_hmtconv_is_printed_with_one_prefix(capsys):
    from hmtconv.cli.main import _show_warning
    _show_warning(UserWarning("hmtconv: building cpu_kernel.c failed"), UserWarning, "native.py", 1)
    assert capsys.readouterr().err == "hmtconv: warning: building cpu_kernel.c failed\n"
