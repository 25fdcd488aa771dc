"""Each round's model logged through the MLflow seam as the round flow does (tasks.tracking.log_round_model):
the transformers flavour loads back with the round's weights and generates as the folder does; a
registered model name gets versions 1..n for n rounds; the tracking keys are checked at load time."""
import json
import shutil
from pathlib import Path

import pytest

from selfalign.flows.cli import main
from selfalign.flows.config import ConfigError, load_config
from selfalign.tasks.tracking import MlflowLogger, NullLogger, check_options, log_round_model, registry_problem

DEMO = Path(__file__).resolve().parents[1] / "deploy" / "presets" / "demo.yaml"


def round_models(tiny_model: str, root: Path, n: int) -> list[Path]:
    """n model folders with different weights, as n rounds of training would leave them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    out = []
    for r in range(1, n + 1):
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * r * torch.randn_like(p, generator=torch.Generator().manual_seed(r)))
        d = root / f"round_{r}" / "model"
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out.append(d)
    return out


def config(tmp_path: Path, **tracking):
    overrides = {"run.dir": str(tmp_path / "run"), "run.rounds": 2}
    overrides |= {f"tracking.{k}": v for k, v in tracking.items()}
    return load_config(DEMO, overrides)


def log_rounds(cfg, models: list[Path], policy0: str) -> tuple[MlflowLogger, list[MlflowLogger], list[dict]]:
    parent = MlflowLogger(cfg.tracking.uri, cfg.tracking.experiment, cfg.run.name,
                          artifact_location=(cfg.run_dir / "mlartifacts").resolve().as_uri())
    children, logged, policy = [], [], policy0
    for r, model in enumerate(models, 1):
        child = parent.child(f"round_{r}")
        logged.append(log_round_model(child, cfg, r, model, policy))
        child.close()
        children.append(child)
        policy = str(model)
    parent.close()
    return parent, children, logged


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def greedy(pipe, prompt: str) -> str:
    return pipe(prompt, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]


def test_transformers_flavour_loads_back_and_rounds_become_registered_versions(tiny_model, tmp_path, monkeypatch):
    import mlflow.pyfunc
    import mlflow.transformers
    import torch
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM, pipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config(tmp_path, uri=uri, log_model="transformers", registered_model_name="selfalign-demo")
    models = round_models(tiny_model, tmp_path, 2)
    parent, children, logged = log_rounds(cfg, models, tiny_model)
    assert [x["version"] for x in logged] == ["1", "2"]

    client = MlflowClient(uri)
    versions = sorted(client.search_model_versions("name='selfalign-demo'"), key=lambda v: int(v.version))
    assert [str(v.version) for v in versions] == ["1", "2"]
    for r, (v, child, x) in enumerate(zip(versions, children, logged), 1):
        # the version points at the logged model's artifacts (MLflow's SQL registry keeps no model id)
        assert v.run_id == child.run_id and v.source == x["source"]
        assert v.source == client.get_logged_model(x["model_id"]).artifact_location
        assert v.tags["selfalign.round"] == str(r) and v.tags["selfalign.run"] == "demo"
        assert v.tags["selfalign.parent_run_id"] == parent.run_id
        assert f"round {r} of 2" in v.description and str(models[r - 1]) in v.description
        # the model is an output of its round's run, at the round's step
        outputs = client.get_run(child.run_id).outputs.model_outputs
        assert [(o.model_id, o.step) for o in outputs] == [(x["model_id"], r)]
        assert str(client.get_logged_model(x["model_id"]).status) == "READY"
    assert logged[0]["model_id"] != logged[1]["model_id"]

    # models:/ URIs resolve through the process-wide tracking URI: the user's side. Set it
    # explicitly (an earlier mlflow.set_tracking_uri in this process would outrank the variable).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for r, model in enumerate(models, 1):
        pipe = mlflow.transformers.load_model(f"models:/selfalign-demo/{r}")
        original = AutoModelForCausalLM.from_pretrained(model)
        got, want = weights(pipe.model), weights(original)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), f"round {r}: weights differ"
        reference = pipeline("text-generation", model=original, tokenizer=str(model))
        assert greedy(pipe, "What is 12 + 30?") == greedy(reference, "What is 12 + 30?")
    # round 2's weights are not round 1's: the versions are distinct models
    w1 = weights(mlflow.transformers.load_model("models:/selfalign-demo/1").model)
    w2 = weights(mlflow.transformers.load_model("models:/selfalign-demo/2").model)
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)
    # and the generic pyfunc loader serves it as a text-in, text-out model
    served = mlflow.pyfunc.load_model(f"models:/{logged[1]['model_id']}")
    out = served.predict(["What is 12 + 30?"], params={"max_new_tokens": 4, "do_sample": False})
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)

    # the copy made for the upload is gone; the round folder is untouched
    assert not list(models[0].parent.glob(".mlflow-model-*"))
    assert sorted(p.name for p in models[0].iterdir()) == sorted(p.name for p in Path(tiny_model).iterdir())


def test_artifact_logging_registers_the_run_folder(tiny_model, tmp_path):
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config(tmp_path, uri=uri, log_model="artifact", registered_model_name="plain")
    models = [tmp_path / "m1", tmp_path / "m2", tmp_path / "m3"]
    for i, m in enumerate(models):
        shutil.copytree(tiny_model, m)
        (m / "round.txt").write_text(str(i + 1))
    _, children, logged = log_rounds(cfg, models, tiny_model)
    client = MlflowClient(uri)
    versions = sorted(client.search_model_versions("name='plain'"), key=lambda v: int(v.version))
    assert [str(v.version) for v in versions] == ["1", "2", "3"] == [x["version"] for x in logged]
    for i, (v, child) in enumerate(zip(versions, children)):
        assert v.run_id == child.run_id and v.source.endswith("/model") and "model_id" not in logged[i]
        assert "model/round.txt" in {a.path for a in client.list_artifacts(child.run_id, "model")}
        local = mlflow.artifacts.download_artifacts(artifact_uri=v.source, dst_path=str(tmp_path / f"dl{i}"))
        assert (Path(local) / "round.txt").read_text() == str(i + 1)


def test_no_model_is_logged_when_log_model_is_none(tiny_model, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config(tmp_path, uri=uri)
    _, children, logged = log_rounds(cfg, [Path(tiny_model)], tiny_model)
    assert logged == [{}]
    assert MlflowClient(uri).list_artifacts(children[0].run_id) == []
    assert NullLogger().log_model(Path(tiny_model), "transformers") == {}


@pytest.mark.parametrize("overrides, message", [
    ({"registered_model_name": "m"}, "tracking.log_model is 'none'"),
    ({"log_model": "transformers", "registered_model_name": "a/b"}, "must not contain '/'"),
    ({"log_model": "transformers", "registered_model_name": "a:b"}, "must not contain ':'"),
    ({"log_model": "transformers", "registered_model_name": "it's"}, "must not contain \"'\""),
    ({"log_model": "artifact", "registered_model_name": " m"}, "must not be blank or start/end with spaces"),
    ({"log_model": "transformers", "registered_model_name": "m", "uri": "none"}, "tracking is off"),
    ({"log_model": "pickle"}, "tracking.log_model: 'pickle' is not one of ['none', 'artifact', 'transformers']"),
])
def test_tracking_keys_are_checked_at_load_time(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match="tracking.") as e:
        config(tmp_path, **overrides)
    assert message in str(e.value)


def test_registry_needs_a_database_or_server_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for uri in ("sqlite:////x/mlflow.db", "postgresql://u@h/db", "mysql+pymysql://u@h/db", "http://127.0.0.1:5000"):
        assert registry_problem(uri) == "", uri
    for uri in (str(tmp_path / "mlruns"), (tmp_path / "mlruns").as_uri()):
        assert "file store" in registry_problem(uri)
        with pytest.raises(ConfigError, match="registered_model_name: 'm' needs a model registry, but .*file store"):
            config(tmp_path, log_model="transformers", registered_model_name="m", uri=uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert registry_problem(str(tmp_path / "mlruns")) == ""
    # the default store (MLFLOW_TRACKING_URI unset): the run's own SQLite file, which holds a registry
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert config(tmp_path, log_model="transformers", registered_model_name="m").tracking.registered_model_name == "m"
    # MLFLOW_TRACKING_URI is the store when tracking.uri is empty
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "mlruns"))
    with pytest.raises(ConfigError, match="file store"):
        config(tmp_path, log_model="transformers", registered_model_name="m")
    check_options("transformers", "m", "")  # no URI given: only the name and the log_model choice


def test_cli_rejects_a_registry_without_a_store(capsys):
    assert main(["run", str(DEMO), "--tracking.registered_model_name=m", "--tracking.log_model=transformers",
                 "--tracking.uri=none"]) == 2
    err = capsys.readouterr().err
    assert "tracking.registered_model_name: 'm' needs a model registry, but tracking is off" in err
    assert "Traceback" not in err


def test_round_flow_logs_and_registers_each_rounds_model(tiny_model, tmp_path, monkeypatch):
    """The round flow's own call (flows/pipeline.py), its stages replaced by stand-ins: two rounds
    give registered versions 1 and 2 holding the two rounds' models; a stopped round logs none."""
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    from selfalign.flows import pipeline
    from selfalign.tasks import artifacts

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config(tmp_path, uri=uri, log_model="transformers", registered_model_name="flow", plots=False)
    models = round_models(tiny_model, tmp_path / "trained", 2)
    for m in models:
        artifacts.mark_done(m, {"stand-in": "train"})  # the train stage's manifest, with its run token
    stop_round = {3}

    class Logger:
        info = warning = staticmethod(lambda *a: None)

    def pairs_task(cfg, r, scores, offline):
        rd = artifacts.round_dir(cfg.run_dir, r)
        rd.mkdir(parents=True, exist_ok=True)
        artifacts.write_json(rd / "alpha_sweep.json", {})
        artifacts.write_table(rd / "pairs.parquet", [])
        return rd / "pairs.parquet", {"pairs/kept": 0 if r in stop_round else 4}

    monkeypatch.setattr(pipeline, "get_run_logger", lambda: Logger)
    monkeypatch.setattr(pipeline, "generate_task", lambda cfg, r, policy, prompts: (tmp_path / "s", {}))
    monkeypatch.setattr(pipeline, "score_task", lambda *a: (tmp_path / "sc", {"eval/pair_accuracy": 0.9}))
    monkeypatch.setattr(pipeline, "pairs_task", pairs_task)
    monkeypatch.setattr(pipeline, "train_task", lambda cfg, r, policy, pairs, tracker=None: (models[r - 1], []))
    monkeypatch.setattr(pipeline, "evaluate_task", lambda *a, **k: {"eval/accuracy": 1.0})
    parent = MlflowLogger(uri, cfg.tracking.experiment, cfg.run.name,
                          artifact_location=(tmp_path / "mlartifacts").as_uri())
    policy = cfg.model.policy
    for r in (1, 2, 3):
        res = pipeline.round_flow.fn(cfg.to_dict(), r, policy, cfg.model.reference, parent.run_id)
        assert bool(res["stopped"]) == (r in stop_round)
        policy = res["model"]
    client = MlflowClient(uri)
    versions = sorted(client.search_model_versions("name='flow'"), key=lambda v: int(v.version))
    assert [(str(v.version), v.tags["selfalign.round"]) for v in versions] == [("1", "1"), ("2", "2")]
    assert f"from {cfg.model.policy}" in versions[0].description and f"from {models[0]}" in versions[1].description
    # a rerun of the same rounds (training skipped: same tokens) registers no second version;
    # a round trained again does
    for r in (1, 2):
        pipeline.round_flow.fn(cfg.to_dict(), r, cfg.model.policy if r == 1 else str(models[0]),
                               cfg.model.reference, parent.run_id)
    assert len(client.search_model_versions("name='flow'")) == 2
    artifacts.mark_done(models[1], {"stand-in": "train again"})
    pipeline.round_flow.fn(cfg.to_dict(), 2, str(models[0]), cfg.model.reference, parent.run_id)
    assert sorted(int(v.version) for v in client.search_model_versions("name='flow'")) == [1, 2, 3]
    # each version holds its round's weights, byte for byte
    for v, model in zip(versions, models):
        logged = mlflow.artifacts.download_artifacts(artifact_uri=f"{v.source}/model/model.safetensors",
                                                     dst_path=str(tmp_path / f"v{v.version}"))
        assert Path(logged).read_bytes() == (model / "model.safetensors").read_bytes()


def test_create_local_store_makes_a_usable_store_once(tmp_path):
    from mlflow.tracking import MlflowClient

    from selfalign.tasks.tracking import create_local_store, local_uri

    uri = local_uri(tmp_path / "run")
    create_local_store(uri)
    db = tmp_path / "run" / "mlflow.db"
    assert db.exists()
    exp = MlflowClient(uri).create_experiment("e")
    stamp = db.stat().st_mtime_ns
    create_local_store(uri)  # an existing store is left alone
    assert db.stat().st_mtime_ns == stamp and MlflowClient(uri).get_experiment(exp).name == "e"
    for other in ("none", "http://127.0.0.1:9", f"file://{tmp_path / 'runs'}"):
        create_local_store(other)  # nothing to create, nothing contacted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_round_tables_are_browsable_in_mlflow(tmp_path):
    """The round's samples with scores, its pairs and the eval answers with their verdicts become
    MLflow tables (what the UI shows), read back through MLflow's own API."""
    from mlflow.tracking import MlflowClient

    from selfalign.flows.run_tracking import log_tables
    from selfalign.tasks import artifacts

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rd = artifacts.round_dir(tmp_path / "run", 1)
    artifacts.write_table(rd / "scores.parquet", [
        {"prompt_id": "p", "k": k, "prompt": "Q?", "response": f"a{k}", "score": float(k), "policy_logp": -1.0,
         "ref_logp": -2.0, "n_tokens": 3, "finish_reason": "stop"} for k in range(3)])
    artifacts.write_table(rd / "pairs.parquet", [
        {"source": "generated", "prompt_id": "p", "prompt": "Q?", "chosen": "a2", "rejected": "a0", "chosen_score": 2.0,
         "rejected_score": 0.0, "chosen_len": 2.0, "rejected_len": 2.0}])
    artifacts.write_table(rd / "eval_greedy.parquet", [
        {"prompt_id": "e1", "prompt": "Say hi.", "response": "hi", "finish_reason": "stop"},
        {"prompt_id": "e2", "prompt": "Say no.", "response": "yes", "finish_reason": "stop"}])
    artifacts.write_json(rd / "eval_per_prompt.json", {"groups": {"e1": "seen", "e2": "heldout"},
                                                       "greedy": {"preferred_rate": {"e1": 1.0, "e2": 0.0}}})
    tracker = MlflowLogger(uri, "selfalign", "round_1", artifact_location=(tmp_path / "art").as_uri())
    log_tables(tracker, rd)
    client = MlflowClient(uri)
    # what the UI lists as the run's tables
    logged = json.loads(client.get_run(tracker.run_id).data.tags["mlflow.loggedArtifacts"])
    assert sorted((a["path"], a["type"]) for a in logged) == [
        ("tables/eval_answers.json", "table"), ("tables/pairs.json", "table"), ("tables/samples.json", "table")]

    def table(name):
        path = client.download_artifacts(tracker.run_id, f"tables/{name}.json", str(tmp_path / name))
        data = json.loads(Path(path).read_text())
        return [dict(zip(data["columns"], row)) for row in data["data"]]

    assert [r["score"] for r in table("samples")] == [0.0, 1.0, 2.0]
    assert [(r["chosen"], r["chosen_score"]) for r in table("pairs")] == [("a2", 2.0)]
    assert [(r["preferred_rate"], r["group"]) for r in table("eval_answers")] == [(1.0, "seen"), (0.0, "heldout")]
