"""Safe defaults, checked on the source: no remote code unless the config says so, weights read and
written as safetensors only, no pickle loading, loopback addresses for what the project starts.
(DeepSpeed's own checkpoint loader unpickles, with weights_only=False: it reads only the round's
checkpoints, files the run itself wrote, and only those stamped by the same training.)"""
import ast
from pathlib import Path

from selfalign.flows.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("flows", "tasks", "kernels") for p in (ROOT / d).rglob("*.py"))


def _calls(name: str, with_args: bool = False):
    """(file:line, owner, keywords) of every call `owner.name(...)` or `name(...)` (and its
    positional arguments, as source, first with `with_args`)."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if called == name:
                    owner = ast.unparse(f.value) if isinstance(f, ast.Attribute) else ""
                    found = (f"{path.relative_to(ROOT)}:{node.lineno}", owner, {k.arg: k.value for k in node.keywords})
                    yield ([ast.unparse(a) for a in node.args], *found) if with_args else found


def _vllm_engine_args() -> dict:
    """The keyword arguments of the generate worker's `LLM(**kwargs)`."""
    (_, _, kw), = [c for c in _calls("dict") if c[0].startswith("tasks/vllm_worker.py") and "enable_prefix_caching" in c[2]]
    return kw


def test_remote_code_is_off_unless_configured():
    assert ModelConfig().trust_remote_code is False
    calls = list(_calls("from_pretrained"))
    assert calls
    for where, owner, kw in calls:
        if owner == "GenerationConfig":  # a JSON file, no code
            continue
        assert "trust_remote_code" in kw, f"{where}: {owner}.from_pretrained without trust_remote_code"
        assert ast.unparse(kw["trust_remote_code"]) != "True", where
    engine = _vllm_engine_args()
    assert ast.unparse(engine["trust_remote_code"]) == "job['trust_remote_code']"


def test_weights_are_safetensors_only():
    for where, owner, kw in _calls("from_pretrained"):
        if owner.startswith("AutoModel"):
            assert ast.unparse(kw.get("use_safetensors", ast.Constant(None))) == "True", where
    for where, owner, kw in _calls("save_pretrained"):
        if owner in ("lm", "model"):
            assert ast.unparse(kw.get("safe_serialization", ast.Constant(None))) == "True", where
    assert ast.unparse(_vllm_engine_args()["load_format"]) == "'safetensors'"


def test_no_pickle_loading():
    for where, owner, kw in _calls("load"):
        if owner == "torch":
            assert ast.unparse(kw.get("weights_only", ast.Constant(None))) == "True", where
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not ({"pickle", "dill", "cloudpickle", "joblib"} & (imported | modules)), path


def test_what_the_project_starts_listens_on_loopback():
    from selfalign.tasks import generate, train

    hosts = [(where, ast.unparse(kw["default"])) for args, where, _, kw in _calls("add_argument", with_args=True)
             if "'--host'" in args]
    assert hosts and all(d == "'127.0.0.1'" for _, d in hosts), hosts
    assert generate.engine_env(1.0)["VLLM_HOST_IP"] == "127.0.0.1"
    for launcher in ("torchrun", "deepspeed"):
        cmd = " ".join(train.launch_command(launcher, 1, Path("spec.json")))
        assert "127.0.0.1" in cmd and "0.0.0.0" not in cmd
    for path in SOURCES:
        assert "0.0.0.0" not in path.read_text(), path


def test_vllm_is_offline_for_a_local_model_and_may_fetch_a_hub_id(tmp_path, monkeypatch):
    from selfalign.tasks.generate import engine_env

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert engine_env(1.0, str(tmp_path))["HF_HUB_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in engine_env(1.0, "org/some-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the user's own setting wins for hub ids
    assert engine_env(1.0, "org/some-model")["HF_HUB_OFFLINE"] == "1"
