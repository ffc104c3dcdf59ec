import json

from gill_hf.cli import main


def test_shortened_quickstart_trains_saves_and_reloads_identically(tmp_path, capsys):
    code = main(["quickstart", "--out", str(tmp_path), "--steps", "6", "--train-size", "16", "--eval-size", "8",
                 "--batch-size", "8"])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    summary = report["summary"]
    assert summary["reload_identical"] is True and len(report["history"]) == 6
    assert 0.0 <= summary["held_out_recall_at_1"] <= 1.0 and summary["chance"] == 0.125
    assert (tmp_path / "gill-adapter" / "model.safetensors").exists()
    assert "held_out_recall_at_1" in capsys.readouterr().out
