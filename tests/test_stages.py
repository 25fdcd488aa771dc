"""Stage functions on hand-made tables: the pair stage's filters, replay mixing and label
precision; the round's prompt slices and scoring reference; the MLflow seam."""
import math

import pytest

from selfalign.flows.config import load_config
from selfalign.flows.pipeline import round_prompts, scoring_reference
from selfalign.tasks import artifacts, toy
from selfalign.tasks.pairs import run_pairs

BASE = {"model.policy": "pi0", "model.reference": "sft", "data.prompts": "p", "data.eval_prompts": "e",
        "data.offline_pairs": "o", "generate.k": 4, "pairs.min_valid": 3,
        "pairs.validity": "selfalign.tasks.toy:is_valid", "pairs.min_chars": 1, "evaluate.preferred": "selfalign.tasks.toy:is_preferred"}


def sample(pid, prompt, k, response, score, finish="stop"):
    return {"prompt_id": pid, "prompt": prompt, "k": k, "response": response, "response_ids": list(range(len(response) + 1)),
            "finish_reason": finish, "n_tokens": len(response) + 1, "policy_logp": -10.0 - k, "ref_logp": -10.0 - k - score,
            "score": score if finish == "stop" else math.nan, "special_tokens": 0}


def test_pair_stage_filters_picks_and_mixes(tmp_path):
    cfg = load_config(None, BASE | {"pairs.gamma": 0.5})
    q1, q2, q3 = "What is 12 + 34?", "What is 50 + 25?", "What is 11 + 11?"
    polite = lambda a, b: toy.render(toy.PREFERRED_STYLE, a, b, a + b)
    plain, other = [lambda a, b, s=s: toy.render(s, a, b, a + b) for s in toy.STYLES if s != toy.PREFERRED_STYLE][:2]
    rows = [
        sample("a", q1, 0, polite(12, 34), 3.0),
        sample("a", q1, 1, plain(12, 34), -1.0),
        sample("a", q1, 2, other(12, 34), 0.5),
        sample("a", q1, 3, polite(12, 34).replace(" ", "", 1) + "!!", 9.0),  # malformed: the hook drops it
        sample("b", q2, 0, plain(50, 25), 1.0),
        sample("b", q2, 1, other(50, 25), 0.0),
        sample("b", q2, 2, polite(50, 25), -2.0),  # the reward is wrong here
        sample("b", q2, 3, polite(50, 25)[:10], 5.0, finish="length"),
        # the text looks perfect but the ids carry a control token the decoder hid: dropped
        sample("b", q2, 4, polite(50, 25), 7.0) | {"special_tokens": 1},
        sample("c", q3, 0, plain(11, 11), 1.0),  # only two valid samples: prompt dropped
        sample("c", q3, 1, other(11, 11), 0.0),
    ]
    scores = tmp_path / "scores.parquet"
    artifacts.write_table(scores, rows)
    # N_off = 6 -> both generated pairs are used and 2 offline ones, never the one sharing prompt q1
    offline = [{"id": f"o{i}", "prompt": q, "chosen": "c", "rejected": "r"}
               for i, q in enumerate([q1, q2] + [f"What is {i} + 2?" for i in range(4)])]
    stats = run_pairs(cfg.pairs, scores, offline, tmp_path / "pairs.parquet", tmp_path / "sweep.json", seed=0,
                      log=lambda m: None, preferred=cfg.evaluate.preferred)
    pairs = artifacts.read_table(tmp_path / "pairs.parquet")
    assert stats["pairs/dropped_invalid"] == 1 and stats["pairs/dropped_truncated"] == 1
    assert stats["pairs/dropped_special"] == 1
    assert stats["pairs/prompts"] == 3 and stats["pairs/prompts_kept"] == 2
    gen = {p["prompt_id"]: p for p in pairs if p["source"] == "generated"}
    assert gen["a"]["chosen"] == polite(12, 34) and gen["a"]["rejected"] == plain(12, 34)
    # reference log-probs for training are the scoring policy's, carried over from the scores table
    assert gen["a"]["ref_chosen_logp"] == -10.0 and gen["a"]["ref_rejected_logp"] == -11.0
    # label precision: prompt a labels correctly, prompt b backwards -> 1 of 2 decisive pairs
    assert stats["eval/label_precision"] == pytest.approx(0.5) and stats["pairs/decisive"] == 2
    off = [p for p in pairs if p["source"] == "offline"]
    assert stats["pairs/generated"] == 2 and stats["pairs/offline"] == len(off) == 2
    assert {p["prompt"] for p in off}.isdisjoint({p["prompt"] for p in gen.values()})
    assert all(math.isnan(p["ref_chosen_logp"]) for p in off)
    sweep = artifacts.read_json(tmp_path / "sweep.json")
    assert sweep["alpha_star"] == stats["alpha_star"] and sweep["trace"][0]["alpha"] == 0.0


def test_round_prompts_take_fresh_slices():
    prompts = [{"id": str(i), "prompt": str(i)} for i in range(10)]
    assert [p["id"] for p in round_prompts(prompts, 4, 1)] == ["0", "1", "2", "3"]
    assert [p["id"] for p in round_prompts(prompts, 4, 3)] == ["8", "9", "0", "1"]
    assert round_prompts(prompts, 0, 5) == prompts


@pytest.mark.parametrize("mode, r, prev, want", [
    ("previous", 1, "sft", "sft"), ("previous", 2, "pi0", "pi0"), ("previous", 3, "pi1", "pi1"),
    ("sft", 3, "pi1", "sft"), ("initial", 1, "sft", "sft"), ("initial", 3, "pi1", "pi0"),
])
def test_scoring_reference(mode, r, prev, want):
    cfg = load_config(None, BASE | {"score.reference": mode})
    assert scoring_reference(cfg, r, prev) == want


def test_mlflow_logger_nests_and_ignores_an_active_run(tmp_path):
    import mlflow

    from selfalign.tasks.tracking import MlflowLogger

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_name="users-own-run"):
        parent = MlflowLogger(uri, "exp", "parent")
        parent.log_params({"train.beta": 0.1, "judge.api_key": "sk-secret"})
        child = parent.child("round_1")
        child.log_metrics({"loss": 0.5, "nan": float("nan")}, step=3)
        child.close()
        parent.close()
    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.metrics == {"loss": 0.5}
    assert client.get_run(parent.run_id).data.params == {"train.beta": "0.1", "judge.api_key": "***"}


def test_identical_generated_pairs_are_dropped_and_counted(tmp_path):
    cfg = load_config(None, BASE | {"pairs.gamma": 0.0, "pairs.validity": "", "pairs.min_valid": 2})
    q1, q2 = "What is 1 + 2?", "What is 2 + 2?"
    rows = [sample("a", q1, 0, "The sum is 3.", 2.0), sample("a", q1, 1, " The sum  is\n3. ", -1.0),
            sample("b", q2, 0, "4", 1.0), sample("b", q2, 1, "It is 4.", 0.0)]
    artifacts.write_table(tmp_path / "scores.parquet", rows)
    stats = run_pairs(cfg.pairs, tmp_path / "scores.parquet", [], tmp_path / "pairs.parquet", tmp_path / "s.json",
                      seed=0, log=lambda m: None)
    pairs = artifacts.read_table(tmp_path / "pairs.parquet")
    assert stats["pairs/dropped_identical"] == 1 and [p["prompt_id"] for p in pairs] == ["b"]
    # gamma = 0 keeps every generated pair, with no offline pair at all (DICE's meaning)
    assert stats["pairs/generated"] == stats["pairs/generated_built"] == 1 and stats["pairs/offline"] == 0


def test_replay_cap_warns_with_the_counts(tmp_path):
    cfg = load_config(None, BASE | {"pairs.gamma": 0.5, "pairs.validity": "", "pairs.min_valid": 2})
    rows = [sample(f"p{i}", f"What is {i} + 1?", k, f"answer {k} to {i}", float(k)) for i in range(6) for k in range(2)]
    artifacts.write_table(tmp_path / "scores.parquet", rows)
    offline = [{"id": "o1", "prompt": "What is 9 + 9?", "chosen": "18!", "rejected": "19"},
               {"id": "o2", "prompt": "What is 8 + 9?", "chosen": "17!", "rejected": "16"}]
    warned = []
    stats = run_pairs(cfg.pairs, tmp_path / "scores.parquet", offline, tmp_path / "pairs.parquet", tmp_path / "s.json",
                      seed=0, log=lambda m: None, warn=warned.append)
    assert stats["pairs/generated"] == 1 and stats["pairs/generated_built"] == 6
    assert warned == ["pairs: replay uses 1 of the 6 generated pairs built (pairs.gamma=0.5, pairs.budget=0, "
                      "2 offline pairs)"]


def test_offline_source_trains_on_the_budget_of_offline_pairs_alone(tmp_path):
    cfg = load_config(None, BASE | {"pairs.source": "offline", "pairs.budget": 3})
    offline = [{"id": f"o{i}", "prompt": f"What is {i} + 2?", "chosen": f"{i + 2}!", "rejected": "no"} for i in range(5)]
    stats = run_pairs(cfg.pairs, None, offline, tmp_path / "pairs.parquet", tmp_path / "s.json", seed=1, log=lambda m: None)
    pairs = artifacts.read_table(tmp_path / "pairs.parquet")
    assert len(pairs) == stats["pairs/kept"] == 3 and {p["source"] for p in pairs} == {"offline"}
    assert stats["pairs/generated_built"] == 0 and not (tmp_path / "s.json").exists()
    again = run_pairs(cfg.pairs, None, offline, tmp_path / "again.parquet", tmp_path / "s.json", seed=2, log=lambda m: None)
    assert again["pairs/kept"] == 3  # another round, another draw of the same size


def test_two_sided_sweep_is_the_default_and_its_side_is_recorded(tmp_path):
    # The reward prefers the short answer: only a negative alpha cancels that.
    q = "What is 5 + 5?"
    rows = [sample("a", q, 0, "10", 2.0), sample("a", q, 1, "It is ten, 10", 1.5), sample("a", q, 2, "x" * 40, 0.0)]
    artifacts.write_table(tmp_path / "scores.parquet", rows)
    for alpha_min, side in ((-1.0, -1), (0.0, 0)):
        cfg = load_config(None, BASE | {"pairs.validity": "", "pairs.min_valid": 2, "pairs.alpha_min": alpha_min})
        stats = run_pairs(cfg.pairs, tmp_path / "scores.parquet", [], tmp_path / "pairs.parquet", tmp_path / "s.json",
                          seed=0, log=lambda m: None)
        assert stats["alpha_side"] == side and (stats["alpha_star"] < 0) == (side == -1)
        assert artifacts.read_json(tmp_path / "s.json")["side"] == {-1: "shorter", 0: "none"}[side]


def test_the_guard_stops_a_round_whose_reward_misranks_the_heldout_pairs(tmp_path, monkeypatch):
    """The round flow, its stages replaced by stand-ins: a scoring reward that ranks too few held-out
    pairs right stops the round before training, and the run keeps the round's input model."""
    from pathlib import Path

    from selfalign.flows import pipeline

    demo = Path(__file__).resolve().parents[1] / "deploy" / "presets" / "demo.yaml"
    cfg = load_config(demo, {"run.dir": str(tmp_path / "run"), "tracking.uri": "none", "tracking.plots": False})
    trained = []

    class Logger:
        info = warning = staticmethod(lambda *a: None)

    def pairs_task(cfg, r, scores, offline):
        artifacts.write_json(artifacts.round_dir(cfg.run_dir, r) / "alpha_sweep.json", {})
        return tmp_path / "pairs.parquet", {"pairs/kept": 10}

    monkeypatch.setattr(pipeline, "get_run_logger", lambda: Logger)
    monkeypatch.setattr(pipeline, "generate_task", lambda cfg, r, policy, prompts: (tmp_path / "s", {}))
    monkeypatch.setattr(pipeline, "score_task", lambda *a: (tmp_path / "sc", {"eval/pair_accuracy": 0.55}))
    monkeypatch.setattr(pipeline, "pairs_task", pairs_task)
    monkeypatch.setattr(pipeline, "train_task", lambda *a: trained.append(a))
    res = pipeline.round_flow.fn(cfg.to_dict(), 1, "pi0", "sft")
    assert not trained and res["model"] == "pi0"
    assert "ranks only 0.550 of the held-out pairs" in res["stopped"] and "guard.min_pair_accuracy = 0.6" in res["stopped"]
