from pathlib import Path

import pytest

from selfalign.flows.config import ConfigError, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "deploy" / "presets" / "demo.yaml"
BASE = {"model.policy": "a", "model.reference": "b", "data.prompts": "p", "data.eval_prompts": "e",
        "data.offline_pairs": "o"}


def test_demo_preset_resolves_paths_relative_to_the_preset():
    cfg = load_config(DEMO)
    assert cfg.model.policy == str((ROOT / "assets/demo/dpo").resolve())
    assert cfg.generate.k == 8 and cfg.run.rounds == 3
    assert cfg.train.lr == 2e-5 and isinstance(cfg.train.epochs, float)
    # defaults of keys the preset leaves out are the DICE ones
    assert cfg.train.zero_stage == "auto" and cfg.score.reference == "previous"
    # auto: nothing to partition on one process; several (or a hostfile's hosts) get ZeRO-2
    assert [cfg.train.zero_stage_for(w) for w in (1, 2, None)] == [0, 2, 2]


def test_dotted_overrides_are_typed():
    cfg = load_config(DEMO, ["--train.beta=0.25", "--generate.k=4", "--run.name=x", "--model.trust_remote_code=false"])
    assert cfg.train.beta == 0.25 and cfg.generate.k == 4 and cfg.run.name == "x"
    assert parse_override("--train.lr=1e-5") == ("train.lr", 1e-5)


BAD_VALUES = [  # (override on the demo preset, what the error says: the key and the value)
    ("--train.betta=0.1", "unknown config key train.betta"),
    ("--trian.beta=0.1", "unknown config section 'trian'"),
    # the list: negative beta, gamma outside [0, 1], K < 2, missing model path, negative lr
    ("--train.beta=-1", "train.beta: -1.0 must be > 0"),
    ("--train.rpo_alpha=-0.5", "train.rpo_alpha: -0.5 must be >= 0"),
    ("--train.beta=0", "train.beta: 0.0 must be > 0"),
    ("--pairs.gamma=1.5", "pairs.gamma: 1.5 must be in [0, 1]"),
    ("--pairs.gamma=-0.1", "pairs.gamma: -0.1 must be in [0, 1]"),
    ("--generate.k=1", "generate.k: 1 must be >= 2"),
    ("--generate.k=0", "generate.k: 0 must be >= 2"),
    ("--model.policy=./no_such_model", "model.policy: './no_such_model' does not exist"),
    ("--model.reference=/no/such/model", "model.reference: '/no/such/model' does not exist"),
    ("--model.policy=not a model", "model.policy: 'not a model' does not exist (and is not a hub id)"),
    ("--train.lr=-1e-5", "train.lr: -1e-05 must be > 0"),
    ("--train.lr=0", "train.lr: 0.0 must be > 0"),
    # every other numeric key with a range
    ("--run.name=", "run.name: '' must be letters, digits"),
    ("--run.rounds=0", "run.rounds: 0 must be >= 1"),
    ("--run.seed=-1", "run.seed: -1 must be >= 0"),
    ("--data.prompts=missing.jsonl", "data.prompts: 'missing.jsonl' does not exist"),
    ("--data.heldout_pairs=/no/such/pairs.parquet", "data.heldout_pairs: '/no/such/pairs.parquet' does not exist"),
    ("--data.offline_pairs=", "data.offline_pairs is required"),
    ("--data.on_bad_row=ignore", "data.on_bad_row: 'ignore' is not one of ['error', 'skip']"),
    ("--data.prompts_per_round=-1", "data.prompts_per_round: -1 must be >= 0"),
    ("--data.max_eval_prompts=-5", "data.max_eval_prompts: -5 must be >= 0"),
    ("--model.dtype=float16", "model.dtype: 'float16' is not one of ['bfloat16', 'float32']"),
    ("--model.trust_remote_code=maybe", "model.trust_remote_code: expected true/false, got 'maybe'"),
    ("--generate.k=many", "generate.k: expected an integer, got 'many'"),
    ("--generate.k=2.5", "generate.k: expected an integer, got 2.5"),
    ("--generate.temperature=0", "generate.temperature: 0.0 must be > 0"),
    ("--generate.top_p=0", "generate.top_p: 0.0 must be in (0, 1]"),
    ("--generate.top_p=1.5", "generate.top_p: 1.5 must be in (0, 1]"),
    ("--generate.max_tokens=0", "generate.max_tokens: 0 must be >= 1"),
    ("--generate.kv_cache_gib=0", "generate.kv_cache_gib: 0.0 must be > 0"),
    ("--generate.gpu_memory_utilization=1.2", "generate.gpu_memory_utilization: 1.2 must be in (0, 1]"),
    ("--generate.tensor_parallel_size=0", "generate.tensor_parallel_size: 0 must be >= 1"),
    ("--generate.max_model_len=-1", "generate.max_model_len: -1 must be >= 0"),
    ("--generate.threads=-1", "generate.threads: -1 must be >= 0"),
    ("--score.reference=best", "score.reference: 'best'"),
    ("--score.batch_tokens=0", "score.batch_tokens: 0 must be >= 1"),
    ("--pairs.min_valid=1", "pairs.min_valid: 1 must be >= 2"),
    ("--pairs.min_valid=9", "pairs.min_valid: 9 must be in [2, generate.k=8]"),
    ("--pairs.alpha_step=0", "pairs.alpha_step: 0.0 must be > 0"),
    ("--pairs.alpha_max=-1", "pairs.alpha_max: -1.0 must be >= 0"),
    ("--pairs.alpha_min=0.5", "pairs.alpha_min: 0.5 must be <= 0"),
    ("--pairs.budget=-1", "pairs.budget: -1 must be >= 0"),
    ("--pairs.source=judge", "pairs.source: 'judge' is not one of ['dice', 'offline']"),
    ("--start.epochs=0", "start.epochs: 0.0 must be > 0"),
    ("--start.lr=-1", "start.lr: -1.0 must be >= 0"),
    ("--run.name=..", "run.name: '..' must be letters, digits"),
    ("--run.name=.", "run.name: '.' must be letters, digits"),
    ("--run.name=../x", "run.name: '../x' must be letters, digits"),
    ("--run.name=a/b", "run.name: 'a/b' must be letters, digits"),
    ("--pairs.min_chars=-1", "pairs.min_chars: -1 must be >= 0"),
    ("--pairs.max_chars=2", "pairs.max_chars: 2 must be > pairs.min_chars=4"),
    ("--pairs.length_unit=words", "pairs.length_unit: 'words'"),
    ("--train.loss=magic", "train.loss: 'magic'"),
    ("--train.label_smoothing=0.5", "train.label_smoothing: 0.5 must be in [0, 0.5)"),
    ("--train.weight_decay=-0.1", "train.weight_decay: -0.1 must be >= 0"),
    ("--train.gamma_beta_ratio=-1", "train.gamma_beta_ratio: -1.0 must be >= 0"),
    ("--train.alpha=-0.2", "train.alpha: -0.2 must be >= 0"),
    ("--train.epochs=0", "train.epochs: 0.0 must be > 0 (or set train.max_steps)"),
    ("--train.max_steps=-1", "train.max_steps: -1 must be >= 0"),
    ("--train.grad_clip=-1", "train.grad_clip: -1.0 must be >= 0"),
    ("--train.threads=-2", "train.threads: -2 must be >= 0"),
    ("--train.batch_size=0", "train.batch_size: 0 must be >= 1"),
    ("--train.batch_size=10", "train.batch_size: 10 must be a multiple of micro_batch_size * nproc = 16"),
    ("--train.micro_batch_size=0", "train.micro_batch_size: 0 must be >= 1"),
    ("--train.nproc=0", "train.nproc: 0 must be >= 1"),
    ("--train.zero_stage=4", "train.zero_stage: 4 is not one of [0, 1, 2, 3, 'auto']"),
    ("--train.zero_stage=two", "train.zero_stage: expected an integer or auto, got 'two'"),
    ("--train.launcher=mpi", "train.launcher: 'mpi'"),
    ("--guard.min_pair_accuracy=1.5", "guard.min_pair_accuracy: 1.5 must be in [0, 1]"),
    ("--evaluate.samples=-1", "evaluate.samples: -1 must be >= 0"),
    ("--evaluate.max_tokens=-1", "evaluate.max_tokens: -1 must be >= 0"),
    # not a number at all: YAML's .nan / .inf, or an exponent past float range
    ("--train.beta=.nan", "train.beta: expected a finite number, got nan"),
    ("--train.lr=.inf", "train.lr: expected a finite number, got inf"),
    ("--pairs.gamma=1e999", "pairs.gamma: expected a finite number, got inf"),
]


@pytest.mark.parametrize("override, needle", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_values_name_key_and_value(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, [override])
    assert needle in str(e.value)


def model_folder(path: Path, *files: str) -> Path:
    """A folder that passes for a model at load time: config.json and the named weight files."""
    path.mkdir()
    (path / "config.json").write_text("{}")
    for f in files or ("model.safetensors",):
        (path / f).write_bytes(b"")
    return path


def test_a_model_folder_is_checked_before_anything_starts(tmp_path, monkeypatch):
    """config.json and safetensors weights, or an error naming the key; a local path with a typo is
    not taken for a hub id when its first folder exists here."""
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"model.reference: '.*half' has no weights \(\*.safetensors\)"):
        load_config(DEMO, [f"--model.reference={tmp_path / 'half'}"])
    model_folder(tmp_path / "pickled", "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"model.policy: '.*pickled' holds only pickled weights \(pytorch_model.bin\)"):
        load_config(DEMO, [f"--model.policy={tmp_path / 'pickled'}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model.policy: '.*empty' has no config.json"):
        load_config(DEMO, [f"--model.policy={tmp_path / 'empty'}"])
    sharded = model_folder(tmp_path / "sharded", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    assert load_config(DEMO, [f"--model.policy={sharded}"]).model.policy == str(sharded)
    monkeypatch.chdir(tmp_path)  # `pickled/` is a folder here: `pickled/typo` is a local path, not org/name
    with pytest.raises(ConfigError, match="model.reference: 'pickled/typo' does not exist"):
        load_config(DEMO, ["--model.reference=pickled/typo"])
    assert load_config(DEMO, ["--model.reference=org/name"]).model.reference == "org/name"


def test_model_and_data_sources(tmp_path):
    """A local-looking source must exist (models as folders); anything else must look like a hub id,
    which is accepted unchecked (no hub is reachable at load time)."""
    cfg = load_config(DEMO, ["--model.policy=org/some-model_v1.5", "--data.prompts=org/prompts"])
    assert cfg.model.policy == "org/some-model_v1.5" and cfg.data.prompts == "org/prompts"
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="model.policy: '.*weights.bin' is not a model folder"):
        load_config(DEMO, [f"--model.policy={tmp_path / 'weights.bin'}"])
    for value in ("org/name/extra", "~/models/x", "-bad"):
        with pytest.raises(ConfigError, match=f"model.reference: '{value}' does not exist"):
            load_config(DEMO, [f"--model.reference={value}"])
    # paths in a preset are relative to it, and named resolved
    preset = tmp_path / "p.yaml"
    preset.write_text("model: {policy: ./pi0, reference: ./sft}\n"
                      "data: {prompts: ./p.jsonl, eval_prompts: ./e.jsonl, offline_pairs: ./o.jsonl}\n")
    with pytest.raises(ConfigError, match=f"model.policy: '{tmp_path / 'pi0'}' does not exist"):
        load_config(preset)
    for name in ("pi0", "sft"):
        model_folder(tmp_path / name)
    with pytest.raises(ConfigError, match=f"data.prompts: '{tmp_path / 'p.jsonl'}' does not exist"):
        load_config(preset)
    for name in ("p.jsonl", "e.jsonl", "o.jsonl"):
        (tmp_path / name).write_text("")
    assert load_config(preset).data.on_bad_row == "error"
    assert load_config(preset, ["--data.on_bad_row=skip"]).data.on_bad_row == "skip"


def test_bad_values_in_a_preset_are_named(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(DEMO.read_text().replace("model:\n", "model:\n  dtype: 16\n")
                      .replace("../../", str(ROOT) + "/").replace("beta: 0.1", "beta: -0.5"))
    with pytest.raises(ConfigError, match="model.dtype: expected a string, got 16"):
        load_config(preset)
    preset.write_text(preset.read_text().replace("  dtype: 16\n", ""))
    with pytest.raises(ConfigError, match="train.beta: -0.5 must be > 0"):
        load_config(preset)


def test_missing_preset_and_malformed_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(DEMO, ["train.beta=0.1"])


def test_defaults_follow_dice():
    cfg = load_config(None, BASE)
    assert (cfg.generate.k, cfg.train.beta, cfg.train.lr, cfg.pairs.gamma, cfg.pairs.min_valid) == (16, 0.1, 5e-7, 0.5, 8)
    assert cfg.run.rounds == 2 and cfg.pairs.length_unit == "chars"
    assert cfg.run_dir == Path("runs/selfalign")


ONE_HOOK = "selfalign.tasks.toy:checker_reward"
TWO_HOOKS = f"{ONE_HOOK},selfalign.tasks.toy:readability_reward"


def test_hpo_reward_weights_take_a_number_or_a_list(tmp_path):
    def weights(value, hooks=ONE_HOOK):
        return load_config(DEMO, {"train.loss": "hpo", "train.hpo.rewards": hooks,
                                  "train.hpo.reward_weights": value}).train.hpo.reward_list()

    assert weights(2) == [(ONE_HOOK, 2.0)]
    assert weights(0.5) == [(ONE_HOOK, 0.5)]
    assert weights([1, 0.25], TWO_HOOKS) == [(ONE_HOOK, 1.0), ("selfalign.tasks.toy:readability_reward", 0.25)]
    assert weights("1,0.25", TWO_HOOKS)[1][1] == 0.25
    # the same from the command line and from a preset file
    cfg = load_config(DEMO, ["--train.loss=hpo", f"--train.hpo.rewards={ONE_HOOK}", "--train.hpo.reward_weights=3"])
    assert cfg.train.hpo.reward_weights == [3.0] and cfg.train.hpo.reward_list() == [(ONE_HOOK, 3.0)]
    preset = tmp_path / "p.yaml"
    preset.write_text(DEMO.read_text().replace("../../", str(ROOT) + "/").replace(
        "train:\n", f"train:\n  loss: hpo\n  hpo:\n    rewards: [{TWO_HOOKS}]\n    reward_weights: [2, 1.5e-1]\n"))
    assert [w for _, w in load_config(preset).train.hpo.reward_list()] == [2.0, 0.15]
    # a number for two rewards: the message says what is expected
    with pytest.raises(ConfigError, match=r"train.hpo.reward_weights: \[2.0\] must give one weight per reward in "
                                          r"train.hpo.rewards \(2\)"):
        weights(2, TWO_HOOKS)
    with pytest.raises(ConfigError, match=r"train.hpo.reward_weights: expected numbers, got \['a', 1\]"):
        weights(["a", 1], TWO_HOOKS)
    with pytest.raises(ConfigError, match="train.hpo.reward_weights: expected numbers, got 'nan'"):
        weights("nan")
    with pytest.raises(ConfigError, match=r"train.hpo.reward_weights: '1;2' must be numbers"):
        weights("1;2", TWO_HOOKS)
    with pytest.raises(ConfigError, match="train.hpo.reward_weights: expected numbers, got True"):
        weights(True)


def test_mrpo_references_resolve_relative_to_the_preset(tmp_path, monkeypatch):
    sub = tmp_path / "presets"
    sub.mkdir()
    (tmp_path / "refs").mkdir()
    for folder in (tmp_path / "refs" / "a", sub / "b", tmp_path / "c"):
        model_folder(folder)
    monkeypatch.chdir(tmp_path)
    preset = sub / "p.yaml"
    preset.write_text(DEMO.read_text().replace("../../", str(ROOT) + "/").replace(
        "train:\n", "train:\n  loss: mrpo\n  mrpo:\n    references: [../refs/a, org/hub-model, ./b]\n"
                     "    tokenizers: ../toks/a,,\n"))
    t = load_config(preset).train
    assert t.mrpo.reference_list() == [(str(tmp_path / "refs" / "a"), str(tmp_path / "toks" / "a")),
                                       ("org/hub-model", ""), (str(sub / "b"), "")]
    # overrides on the command line stay relative to the working directory, as for every path key
    t = load_config(preset, ["--train.mrpo.references=./c", "--train.mrpo.tokenizers="]).train
    assert t.mrpo.references == ["./c"] and t.mrpo.tokenizers == []
    with pytest.raises(ConfigError, match=r"train.mrpo.tokenizers: \['', ''\] must give one entry .* \(1\)"):
        load_config(preset, ["--train.mrpo.references=./c", "--train.mrpo.tokenizers=,"])


def test_grouped_keys_nest_in_a_preset_and_on_the_command_line(tmp_path):
    """`train: {lora: {r: 8}}` in a preset and `--train.lora.r=8` on the command line set train.lora.r;
    the old flat spelling fails naming the nested one."""
    preset = tmp_path / "p.yaml"
    model_folder(tmp_path / "ref")
    preset.write_text("model: {policy: m, reference: m}\ndata: {prompts: p, eval_prompts: e, offline_pairs: o}\n"
                      "train:\n  beta: 0.2\n  lora:\n    enabled: true\n    r: 8\n    target_modules: [q_proj, v_proj]\n"
                      "  mrpo:\n    references: ./ref\n")
    cfg = load_config(preset, ["--train.lora.alpha=4", "--train.lora.r=4"])
    t = cfg.train
    assert (t.beta, t.lora.enabled, t.lora.r, t.lora.alpha, t.lora.target_modules) == (0.2, True, 4, 4.0, ["q_proj", "v_proj"])
    assert t.mrpo.references == [str((tmp_path / "ref").resolve())]  # grouped path keys resolve like flat ones
    assert cfg.flat()["train.lora.r"] == 4 and "train.lora_r" not in cfg.flat()  # MLflow's param names
    assert load_config(preset, ["--train.lora.target_modules=q_proj,k_proj"]).train.lora.target_modules == ["q_proj", "k_proj"]
    with pytest.raises(ConfigError, match="unknown config key train.lora.rank"):
        load_config(preset, ["--train.lora.rank=4"])
    with pytest.raises(ConfigError, match=r"unknown config key train.lora_r \(train.lora.r\? known in train"):
        load_config(preset, ["--train.lora_r=4"])
    with pytest.raises(ConfigError, match="train.lora: expected a mapping, got 4"):
        load_config(preset, {"train.lora": 4})
