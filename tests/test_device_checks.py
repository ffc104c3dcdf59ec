"""bench/device_checks.py, the script a lent GPU runs, dry-runs on the CPU: it must not rot between GPU sessions."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_checks_dry_run_on_cpu(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "device_checks.py"), "--out", str(tmp_path),
                          "--device", "cpu", "--skip", "benches", "--steps", "2"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    checks = json.loads((tmp_path / "device_checks.json").read_text())["checks"]
    assert {name: entry["status"] for name, entry in checks.items()} == {
        "train-fp32": "ok", "train-bf16": "ok", "pipeline": "ok", "offload": "skipped", "llm-4bit": "skipped",
        "benches": "skipped"}
    assert checks["train-bf16"]["result"]["backbone_dtype"] == "torch.bfloat16"
    for mode, kind in (("retrieve", "retrieved"), ("generate", "generated")):
        assert [part["kind"] for part in checks["pipeline"]["result"][mode] if isinstance(part, dict)] == [kind]
    assert "CUDA" in checks["offload"]["why"] and "CUDA" in checks["llm-4bit"]["why"]
