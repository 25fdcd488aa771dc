"""The promotion rule of a continual chain (flows/continual.decide) on a real local MLflow registry:
the alias moves to the run's final version only when its metric beats the start by more than the
margin; the decision and its numbers are written, tagged and logged either way. The whole chain
through a scheduler and a worker is tests/test_schedule.py (slow)."""
import json
from pathlib import Path

import pytest

from selfalign.flows.config import load_config
from selfalign.flows.continual import CHAIN, decide
from selfalign.tasks.tracking import NullLogger

DEMO = "deploy/presets/demo.yaml"


class Tags(NullLogger):
    def __init__(self):
        self.tags, self.metrics = {}, {}

    def set_tag(self, key, value):
        self.tags[key] = value

    def log_metrics(self, metrics, step=None):
        self.metrics |= metrics


@pytest.mark.parametrize("margin, promoted", [(0.05, True), (0.2, False)])
def test_the_alias_moves_only_past_the_margin(tmp_path, monkeypatch, margin, promoted):
    from mlflow.tracking import MlflowClient

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    run_dir = tmp_path / "chain" / "20261205-000000"
    cfg = load_config(DEMO, [f"--run.dir={run_dir}", "--continual.alias=champion", f"--continual.margin={margin}",
                             f"--tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "--tracking.log_model=artifact",
                             "--tracking.registered_model_name=chain"])
    run_dir.mkdir(parents=True)
    (run_dir / CHAIN).write_text(json.dumps({"alias": "champion", "version": "1", "excluded_prompts": ["p1"]}))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("chain")
    for version, where in (("1", "earlier"), ("2", str(run_dir))):
        client.create_model_version("chain", source=str(tmp_path), tags={"selfalign.run_dir": where, "selfalign.round": "1"})
    client.set_registered_model_alias("chain", "champion", "1")

    tracker = Tags()
    rows = [{"round": 0, "eval/preferred_rate": 0.5}, {"round": 1, "eval/preferred_rate": 0.6}]
    d = decide(cfg, rows, ["p2", "p3"], tracker)
    assert d["promoted"] is promoted and d["version"] == "2" and d["from_version"] == "1"
    assert d["start"] == 0.5 and d["final"] == 0.6
    assert str(client.get_model_version_by_alias("chain", "champion").version) == ("2" if promoted else "1")
    assert tracker.tags["continual.decision"] == ("promoted" if promoted else "kept")
    assert tracker.metrics["continual/margin"] == margin
    assert json.loads((run_dir / "used_prompts.json").read_text()) == ["p1", "p2", "p3"]
    assert json.loads((run_dir / "continual_decision.json").read_text()) == d
