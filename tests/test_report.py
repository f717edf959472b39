import importlib
import importlib.util
import json
import os
import shutil
import subprocess

import matplotlib.axes
import pytest

from hmtconv.report import (append_jsonl, atomic_write_json, curves_table, layers_table, plot_curves,
                            plot_layers, plot_tradeoff, provenance, read_jsonl, write_reports)
from hmtconv.sweep import GRID_KEYS

RESULT = {
    "ann_accuracy": 99.1, "snn_accuracy": [95.0, 97.5, 98.8], "energy_ratio": [0.1, 0.2, 0.31],
    "per_layer": [{"name": "features.2", "lam": 0.05, "firing_rate": 0.12, "mean_abs_error": 0.01},
                  {"name": "features.6", "lam": [0.1, 0.2], "firing_rate": 0.08, "mean_abs_error": 0.02}],
}


def test_atomic_write_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"v": 1})

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left behind


def test_unwritable_directory_raises_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        atomic_write_json(blocker / "out.json", {})  # a file where a directory should be


def test_jsonl_skips_torn_last_line(tmp_path):
    path = tmp_path / "points.jsonl"
    append_jsonl(path, {"a": 1})
    append_jsonl(path, {"a": 2})
    with open(path, "a") as handle:
        handle.write('{"a": 3')  # interrupted mid-write
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []
    append_jsonl(path, {"a": 4})  # a resumed run: its record starts a new line, not the torn one
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 4}]


def test_lines_past_ten_colours_are_told_apart_by_their_dashes_and_unmeasured_errors_say_so(tmp_path, monkeypatch):
    from hmtconv.report.plots import _style
    assert _style(10)["color"] == _style(0)["color"] and _style(10)["ls"] != _style(0)["ls"]
    assert len({tuple(_style(i).items()) for i in range(40)}) == 40
    titles = []
    real = matplotlib.axes.Axes.set
    monkeypatch.setattr(matplotlib.axes.Axes, "set", lambda self, **k: titles.append(k.get("title")) or real(self, **k))
    unmeasured = {**RESULT, "per_layer": [{**layer, "mean_abs_error": None} for layer in RESULT["per_layer"]]}
    plot_layers(unmeasured, tmp_path / "u.png")
    assert "Conversion error (not measured)" in titles


def test_plots_are_png(tmp_path):
    unmeasured = {**RESULT, "per_layer": [{**layer, "mean_abs_error": None} for layer in RESULT["per_layer"]]}
    many = {f"run {i}": RESULT for i in range(12)}  # (colours repeat after 10: the dashes tell them apart)
    for path in (plot_curves(many, tmp_path / "c.png"), plot_layers(RESULT, tmp_path / "l.png"),
                 plot_layers(unmeasured, tmp_path / "u.png"),
                 plot_tradeoff([{"label": "opt", "accuracy": 98.0, "energy_ratio": 0.2},
                                {"label": "opt", "accuracy": 99.0, "energy_ratio": 0.4}], tmp_path / "t.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tables():
    table = curves_table({"n=4 opt": RESULT})
    assert "| n=4 opt " in table and "98.80" in table and "0.310" in table
    assert "features.6" in layers_table(RESULT) and "SOPs" not in layers_table(RESULT)  # (a record without them)


def counted(result):
    """RESULT with the per-site accumulates evaluate reports where it counts energy."""
    layers = [{**layer, "synops_cumulative": sops} for layer, sops in
              zip(result["per_layer"], ([10.0, 20.0, 30.0], [5.0, 8.0, 10.0]))]
    return {**result, "per_layer": layers}


def test_layers_table_gives_each_sites_accumulates_and_share():
    lines = layers_table(counted(RESULT)).splitlines()
    assert "SOPs/sample" in lines[0] and "% of SOPs" in lines[0]
    assert lines[2].split("|")[5:7] == [" 30          ", " 75.00     "]  # at the last step: 30 of 40
    assert lines[3].split("|")[5:7] == [" 10          ", " 25.00     "]


def test_layers_plot_has_a_panel_of_accumulates_where_they_were_counted(tmp_path, monkeypatch):
    heights = []
    real = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, x, h, **k: heights.append(list(h)) or real(
        self, x, h, **k))
    assert plot_layers(counted(RESULT), tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"
    assert heights == [[0.12, 0.08], [30.0, 10.0], [0.01, 0.02]]
    heights.clear()
    plot_layers(RESULT, tmp_path / "l.png")
    assert heights == [[0.12, 0.08], [0.01, 0.02]]


def test_a_module_swapped_run_has_no_energy_row_or_line(tmp_path):
    """Models fx cannot trace are simulated without operation counts: energy_ratio is None."""
    uncounted = {**RESULT, "energy_ratio": None}
    table = curves_table({"swapped": uncounted, "traced": RESULT})
    assert "swapped energy" not in table and "traced energy" in table and "98.80" in table
    assert plot_curves({"swapped": uncounted}, tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    grid = {"n": 4, "T": 3, "neuron": "hmt", "identity": "none", "communicate": True, "granularity": "layer"}
    write_reports([{"model": "m", **grid, "policy": policy, "result": {**uncounted, "spikes_per_sample": 1.0}}
                   for policy in ("opt", "999")], tmp_path / "sweep", GRID_KEYS)
    assert not (tmp_path / "sweep" / "tradeoff-m.png").exists()  # no accuracy-vs-energy plot at energy 0


def test_provenance_has_versions_and_config():
    record = provenance({"n": 4}, seed=3, device="cpu")
    assert record["config"] == {"n": 4} and record["seed"] == 3
    assert {"hmtconv", "torch", "torchvision"} <= set(record["versions"])
    json.dumps(record)


def test_git_commit_is_not_the_commit_of_a_repository_hmtconv_is_installed_in(tmp_path):
    """An installed (not editable) hmtconv under the user's own git repository records no commit."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(git[:-2] + ["init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.txt").write_text("a")
    subprocess.run(git + ["add", "a.txt"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "user's"], check=True)
    installed = tmp_path / ".venv" / "site-packages" / "hmtconv" / "report" / "provenance.py"
    installed.parent.mkdir(parents=True)
    shutil.copy(importlib.import_module("hmtconv.report.provenance").__file__, installed)  # (not the function)
    spec = importlib.util.spec_from_file_location("installed_provenance", installed)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy.git_commit() is None


def test_sweep_report_shows_a_run_whose_own_T_left_the_grid(tmp_path):
    """T = 1 and 2 of a T-independent policy answered by a 3-step run (a grid that had T = 3 before)."""
    grid = {"n": 4, "policy": "999", "neuron": "hmt", "identity": "none", "communicate": True, "granularity": "layer"}
    records = [{"model": "cnn", **grid, "T": T, "simulated_T": 3,
                "result": {**RESULT, "snn_accuracy": RESULT["snn_accuracy"][:T],
                           "energy_ratio": RESULT["energy_ratio"][:T], "agreement": None, "spikes_per_sample": 10.0 * T}}
               for T in (1, 2)]
    write_reports(records, tmp_path, GRID_KEYS)
    table = (tmp_path / "table.md").read_text()
    assert "| T=2        | 99.10 | 95.00 | 97.50 |" in table, table
    assert (tmp_path / "curves-cnn.png").read_bytes()[:4] == b"\x89PNG"


def test_models_whose_names_map_to_one_file_name_keep_a_plot_each(tmp_path):
    """``hf:a/b`` and ``hf:a_b`` both read ``hf_a_b`` in a file name: the second plot must not
    overwrite the first."""
    grid = {"n": 4, "T": 3, "policy": "999", "neuron": "hmt", "identity": "none", "communicate": True,
            "granularity": "layer"}
    records = [{"model": model, **grid, "result": {**RESULT, "spikes_per_sample": 1.0}}
               for model in ("hf:a/b", "hf:a_b", "hf_a_b-2")]
    write_reports(records, tmp_path, GRID_KEYS)
    assert sorted(p.name for p in tmp_path.glob("curves-*.png")) == [
        "curves-hf_a_b-2-2.png", "curves-hf_a_b-2.png", "curves-hf_a_b.png"]


def test_sweep_report_shows_grid_values_as_given(tmp_path):
    """A percentile 99.999 is not rounded to the table's 2 decimals (100.00, like the policy 100)."""
    grid = {"n": 4, "T": 3, "neuron": "hmt", "identity": "none", "communicate": True, "granularity": "layer"}
    records = [{"model": "m", **grid, "policy": policy, "result": {**RESULT, "spikes_per_sample": 1.0}}
               for policy in ("opt", 99.999, 100)]
    write_reports(records, tmp_path, GRID_KEYS)
    table = (tmp_path / "table.md").read_text()
    assert "| m     | 4 | 3 | 99.999 |" in table and "| snn     | 99.999 | 1 [1, 1]      |" in table, table


def test_a_new_report_removes_plots_the_earlier_one_drew_and_it_does_not(tmp_path):
    """Renamed models and a T no longer varying left the old plots beside the new table."""
    grid = {"n": 4, "policy": "999", "neuron": "hmt", "identity": "none", "communicate": True, "granularity": "layer"}
    records = [{"model": "old", **grid, "T": T, "result": {**RESULT, "snn_accuracy": RESULT["snn_accuracy"][:T],
                                                            "energy_ratio": RESULT["energy_ratio"][:T],
                                                            "spikes_per_sample": 1.0}} for T in (1, 2)]
    write_reports(records, tmp_path, GRID_KEYS)
    assert {p.name for p in tmp_path.glob("*.png")} == {"by-T-old.png", "curves-old.png", "tradeoff-old.png"}
    (tmp_path / "mine.png").write_bytes(b"")  # not a report's: kept
    write_reports([{**records[1], "model": "new"}], tmp_path, GRID_KEYS)
    assert {p.name for p in tmp_path.glob("*.png")} == {"curves-new.png", "tradeoff-new.png", "mine.png"}
