"""Command line: `selfalign run <preset.yaml> [--section.key=value ...]`."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from selfalign.flows.config import ConfigError, load_config

TABLE = [  # (header, metric key, format)
    ("round", "round", "{:d}"),
    ("preferred", "eval/preferred_rate", "{:.3f}"),
    ("pref(sampled)", "eval/preferred_rate_sampled", "{:.3f}"),
    ("accuracy", "eval/accuracy", "{:.3f}"),
    ("label_prec", "eval/label_precision", "{:.3f}"),
    ("pair_acc", "eval/pair_accuracy", "{:.3f}"),
    ("alpha*", "alpha_star", "{:.3f}"),
    ("pairs", "pairs/kept", "{:d}"),
    ("len_chosen", "len/chosen_mean", "{:.1f}"),
    ("len_rejected", "len/rejected_mean", "{:.1f}"),
    ("seconds", "round/seconds", "{:.0f}"),
]


def format_table(rows: list[dict]) -> str:
    cells = [[h for h, _, _ in TABLE]]
    for row in rows:
        line = []
        for _, key, fmt in TABLE:
            v = row.get(key)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                line.append("-")
            else:
                line.append(fmt.format(int(v) if fmt == "{:d}" else v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def prepare_environment(run_dir: Path) -> None:
    """Keep Prefect, MLflow and the engines quiet, local and inside the project's folders unless
    the user configured them (a Prefect server via PREFECT_API_URL, say)."""
    state = Path(os.environ.get("SELFALIGN_HOME", Path.cwd() / ".selfalign"))
    defaults = {
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_LOCAL_STORAGE_PATH": str(state / "prefect" / "storage"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_HOST_IP": "127.0.0.1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    # Prefect creates only the last level of its home; make the whole path.
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.preset, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    prepare_environment(cfg.run_dir)
    from selfalign.flows.pipeline import run_flow, tracking_uri

    summary = run_flow(cfg.to_dict())
    print()
    print(format_table(summary["rounds"]))
    if summary["stopped"]:
        print(f"\nstopped early: {summary['stopped']}")
    print(f"\nfinal model: {summary['final_model']}")
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:"):
        print(f"compare rounds: mlflow ui --backend-store-uri {uri}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfalign", description="Iterative self-alignment with DPO implicit rewards (DICE).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run multi-round DICE from a preset")
    p.add_argument("preset", help="preset YAML, e.g. deploy/presets/demo.yaml")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key=value overrides")
    p.set_defaults(func=cmd_run)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
