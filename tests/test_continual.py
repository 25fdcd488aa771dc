"""Continual bootstrapping (flows/continual.py) through the real CLI on the demo: the first run of a
chain starts from the preset's model and promotes its final model to @champion; the next run starts
from the champion, on prompts the first did not use, in a folder of its own, and keeps the alias when
its model does not beat the champion by the margin."""
import json

import pyarrow.parquet as pq
import pytest

from test_e2e import run_cli

pytestmark = pytest.mark.slow

CHAIN = ["--continual.alias=champion", "--tracking.log_model=artifact", "--tracking.registered_model_name=chain",
         "--data.prompts_per_round=16"]


def test_a_chain_continues_from_the_champion_on_fresh_prompts(tmp_path):
    from mlflow.tracking import MlflowClient

    first = run_cli(tmp_path, *CHAIN, "--continual.margin=-1")  # any result is promoted
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    [one] = [d for d in (tmp_path / "run").iterdir() if d.is_dir() and (d / "continual.json").exists()]
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    champ = client.get_model_version_by_alias("chain", "champion")
    assert champ.tags["selfalign.run_dir"].endswith(one.name) and champ.tags["selfalign.round"] == "1"
    decision = json.loads((one / "continual_decision.json").read_text())
    assert decision["promoted"] and decision["from_version"] is None
    used_first = set(json.loads((one / "used_prompts.json").read_text()))
    assert len(used_first) == 16

    second = run_cli(tmp_path, *CHAIN, "--continual.margin=10")  # nothing beats the champion by 10
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    [two] = [d for d in (tmp_path / "run").iterdir() if d.is_dir() and d != one and (d / "continual.json").exists()]
    chain = json.loads((two / "continual.json").read_text())
    assert chain["version"] == str(champ.version) and chain["model"] == champ.tags["selfalign.model_dir"]
    assert set(chain["excluded_prompts"]) == used_first
    # the second run's training prompts: none of the first's
    ids = set(pq.read_table(two / "round_1" / "samples.parquet").column("prompt_id").to_pylist())
    assert ids and not ids & used_first
    decision = json.loads((two / "continual_decision.json").read_text())
    assert not decision["promoted"] and decision["from_version"] == str(champ.version)
    assert str(client.get_model_version_by_alias("chain", "champion").version) == str(champ.version)  # unchanged
    runs = client.search_runs([client.get_experiment_by_name("selfalign").experiment_id],
                              "tags.`continual.decision` = 'kept'")
    assert len(runs) == 1 and runs[0].data.tags["continual.from_version"] == str(champ.version)
