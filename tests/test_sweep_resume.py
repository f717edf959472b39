"""Ctrl-C in the middle of a sweep keeps every finished point; re-running does only the rest."""
import os
import re
import signal

import pytest
import torch
from torch import nn

import hmtconv.sweep as sweep
from hmtconv.cli.main import main
from hmtconv.errors import UserError
from hmtconv.report import read_jsonl
from hmtconv.sweep import ModelEntry, SweepConfig, run_sweep
from hmtconv.workload import DataOptions


def test_interrupted_sweep_resumes_without_redoing_points(tmp_path, monkeypatch):
    model = tmp_path / "cnn.pt"
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(4 * 36, 10)).eval(), model)
    config = SweepConfig(models=[ModelEntry("cnn", str(model))], T=[1, 2, 3, 4], out=str(tmp_path / "out"),
                         data=DataOptions(dataset="mnist", limit=16, calib_size=16, batch_size=16))
    real, calls = sweep.evaluate, []

    def interrupted(snn, *args, **kwargs):
        calls.append(snn.config.T)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(snn, *args, **kwargs)

    monkeypatch.setattr(sweep, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, progress=False)
    results = tmp_path / "out" / "results.jsonl"
    assert [r["T"] for r in read_jsonl(results)] == [1, 2]
    assert "| cnn   | 4 | 2 |" in (tmp_path / "out" / "table.md").read_text()  # the finished points are reported

    calls.clear()
    records = run_sweep(config, progress=False)
    assert calls == [3, 4]  # the finished points are not redone
    assert [r["T"] for r in records] == [1, 2, 3, 4]
    assert (tmp_path / "out" / "table.md").exists()

    calls.clear()  # where the data lies, who loads it, how batches are chunked: the same results
    monkeypatch.setattr(sweep, "evaluate", lambda snn, *args, **kwargs: calls.append(snn.config.T) or real(
        snn, *args, **kwargs))
    config.data.data_root, config.data.workers, config.memory_budget = str(tmp_path), 1, "1GB"
    assert [r["T"] for r in run_sweep(config, progress=False)] == [1, 2, 3, 4] and calls == []
    config.data.seed = 1
    run_sweep(config, progress=False)
    assert calls == [1, 2, 3, 4]


def test_a_terminated_sweep_keeps_and_reports_its_finished_points(tmp_path, monkeypatch, capsys):
    """SIGTERM (kill, a timeout, a job scheduler) as Ctrl-C: it ended the process with the report
    half-written and hidden temporary files left beside it."""
    model = tmp_path / "cnn.pt"
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 144, 10)).eval(),
               model)
    config = tmp_path / "sweep.toml"
    config.write_text(f'out = "{tmp_path / "out"}"\n[data]\ndataset = "mnist"\nlimit = 16\ncalib_size = 16\n'
                      f'[[models]]\nname = "cnn"\nmodel = "{model}"\n[grid]\nT = [1, 2, 3]\npolicy = ["opt"]\n')
    real, calls = sweep.evaluate, []

    def terminated(snn, *args, **kwargs):
        calls.append(snn.config.T)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(snn, *args, **kwargs)

    monkeypatch.setattr(sweep, "evaluate", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["sweep", str(config), "--no-progress"]) == 143
    assert "hmtconv: terminated" in capsys.readouterr().err and signal.getsignal(signal.SIGTERM) == before
    assert [r["T"] for r in read_jsonl(tmp_path / "out" / "results.jsonl")] == [1, 2]
    assert "| cnn   | 4 | 2 |" in (tmp_path / "out" / "table.md").read_text()
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_T_independent_policy_is_simulated_once_for_every_T(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = tmp_path / "cnn.pt"
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 144, 10)).eval(),
               model)
    config = SweepConfig(models=[ModelEntry("cnn", str(model))], T=[1, 3], policy=["999", "opt"],
                         out=str(tmp_path / "out"), data=DataOptions(dataset="mnist", limit=16, calib_size=16))
    real, calls = sweep.evaluate, []
    monkeypatch.setattr(sweep, "evaluate", lambda snn, *a, **k: calls.append(snn.config.policy) or real(snn, *a, **k))
    records = {(r["policy"], r["T"]): r for r in run_sweep(config, progress=False)}
    assert sorted(calls) == ["999", "opt", "opt"]
    short, long = records[("999", 1)], records[("999", 3)]
    assert short["simulated_T"] == 3 and short["result"]["snn_accuracy"] == long["result"]["snn_accuracy"][:1]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "by T" in table
    ratio = long["result"]["per_layer"][0]["lam"] / records[("opt", 3)]["result"]["per_layer"][0]["lam"]
    cell = re.escape(f"{ratio:.3g} [{ratio:.3g}, {ratio:.3g}]")  # one site: median = min = max
    assert re.search(rf"\| T=3 +\| 999 +\| {cell} +\|", table), table


def test_changed_settings_rerun_points_and_set_old_records_aside(tmp_path, monkeypatch, capsys):
    model = tmp_path / "cnn.pt"
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 144, 10)).eval(),
               model)
    config = SweepConfig(models=[ModelEntry("cnn", str(model))], T=[1, 2], policy=["999"], out=str(tmp_path / "out"),
                         data=DataOptions(dataset="mnist", limit=16, calib_size=16, batch_size=16))
    real, calls = sweep.evaluate, []
    monkeypatch.setattr(sweep, "evaluate", lambda snn, *a, **k: calls.append(snn.config.T) or real(snn, *a, **k))
    run_sweep(config, progress=False)
    config.data.seed = 1  # a changed data setting re-runs the point
    assert [r["provenance"]["config"]["data"]["seed"] for r in run_sweep(config, progress=False)] == [1, 1]
    assert "set aside 2 stored record(s)" in capsys.readouterr().out
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 144, 10)).eval(),
               model)  # new weights in the same file
    config.T = [1]
    records = run_sweep(config, progress=False)
    assert calls == [2, 2, 1] and [r["T"] for r in records] == [1]
    assert "set aside 4 stored record(s)" in capsys.readouterr().out
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| cnn" in table and table.count("| cnn") == 1  # only the current grid's point


@pytest.mark.parametrize("text, message", [
    ('[grid]\ncommunicate = [true, "false"]', '[grid] communicate = "false" must be true or false'),
    ('diagnostics = "false"', 'diagnostics = "false" must be true or false'),
    ('[data]\ncalib_size = "64"', '[data] calib_size = "64" must be an integer'),
    ('[grid]\nn = [true]', '[grid] n = true must be an integer'),
    ('grid = [1]', 'grid = [1] must be a [grid] table of lists'),
    ('[[models]]\nname = 1\nmodel = "y"', '[[models]] name = 1 must be a string'),
    ('[[models]]\nmodel = 5', '[[models]] model = 5 must be a string'),  # (not its name, which defaults to it)
    ('[data]\ncalib_split = "test"', '[data] calib_split = "test" must be one of train, val'),
    ('[data]\nlimit = 0', '[data] limit = 0 must be at least 1'),
    ('[data]\nworkers = -1', '[data] workers = -1 must be at least 0 (0: load in the main process)'),
    ('[data]\nworkers = true', '[data] workers = true must be an integer'),
    ('[data]\nworkers = 0', None),
    ('[data]\nseed = -1', '[data] seed = -1 must be in 0..9223372036854775807'),  # (as --seed)
    ('[data]\nseed = 9223372036854775807', None),
    ('[data]\nseed = 9223372036854775808', '[data] seed = 9223372036854775808 must be in 0..9223372036854775807'),
    ('memory_budget = "4 apples"', "memory_budget: cannot read memory size '4 apples'; write a number of at least "
                                   "one byte with an optional unit, e.g. 512MB, 4GB or 1.5GiB"),
])
def test_config_values_of_the_wrong_type_or_range_are_errors(tmp_path, text, message):
    path = tmp_path / "sweep.toml"
    path.write_text(text + '\n[[models]]\nname = "x"\nmodel = "x"\n' if "[[models]]" not in text else text + "\n")
    if message is None:
        sweep.load_config(path)
        return
    with pytest.raises(UserError) as error:
        sweep.load_config(path)
    assert str(error.value) == f"{path}: {message}"


def test_a_config_that_is_not_utf8_is_an_error(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_bytes(b'out = "\xff"\n')
    with pytest.raises(UserError, match=f"sweep config {re.escape(str(path))} is not valid TOML: 'utf-8' codec"):
        sweep.load_config(path)


def test_duplicate_model_names_are_an_error():
    with pytest.raises(UserError, match="two \\[\\[models\\]\\] are named 'net'; give each a different name"):
        SweepConfig(models=[ModelEntry("net", "a.pt"), ModelEntry("net", "b.pt")])


def test_an_empty_grid_list_is_an_error():
    with pytest.raises(UserError, match=r"\[grid\] n is empty"):
        SweepConfig(models=[ModelEntry("net", "a.pt")], n=[])


@pytest.mark.parametrize("grid, message", [({"n": [4, 17]}, r"\[grid\] n = 17 must be in 1..16"),
                                           ({"policy": ["opt", "nope"]}, r"\[grid\] policy = \"nope\""),
                                           ({"neuron": ["lif"]}, r"\[grid\] neuron = \"lif\": neuron must be one of")])
def test_bad_grid_values_are_errors_before_any_point_runs(grid, message):
    with pytest.raises(UserError, match=message):
        SweepConfig(models=[ModelEntry("net", "a.pt")], **grid)


def test_a_model_name_without_weights_is_the_same_random_network_in_every_run(tmp_path):
    """Else a resumed sweep would mix points of two different random networks."""
    def lams(out):
        config = SweepConfig(models=[ModelEntry("vgg", "vgg_small")], T=[1], out=str(tmp_path / out),
                             data=DataOptions(dataset="mnist", limit=8, calib_size=8, batch_size=8))
        return [layer["lam"] for layer in run_sweep(config, progress=False)[0]["result"]["per_layer"]]

    first = lams("a")
    torch.rand(1)  # the global random state moves on, as it does between processes
    assert lams("b") == first


def test_a_percentile_written_as_text_and_as_a_number_is_one_point():
    """Was run twice (and shown as 99.9 and 99.90); named policies and per-site strings stay as written."""
    config = SweepConfig(models=[ModelEntry("cnn", "x")], T=[2], n=[4],
                         policy=["99.9", 99.9, "999", "opt,*x=99.5", 100, 100.0, "100"])
    assert [p["policy"] for p in config.points()] == [99.9, "999", "opt,*x=99.5", 100]
