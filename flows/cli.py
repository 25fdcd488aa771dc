"""Command line: `selfalign run <preset.yaml> [--section.key=value ...]`, `selfalign compare <run>`,
`selfalign server`, `selfalign deploy <preset>`, `selfalign train-node <run folder> --node-rank i`.
Over 400 lines for one job: a thin handler per subcommand beside the one parser they share."""
from __future__ import annotations

import argparse
import errno
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from selfalign.flows.compare import CompareError, compare, format_markdown, format_table, write_csv
from selfalign.flows.config import ConfigError, load_config
from selfalign.tasks.data import DataError
from selfalign.tasks.tracking import check_options

# The project's validation errors: their message names the key, file, row or value, so the command
# line prints it alone (no traceback) and exits with status 2, as argparse does for bad arguments.
USER_ERRORS = (ConfigError, DataError)


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
    if os.environ.get("CI", "").lower() in ("true", "1"):
        # CI logs get the stage summaries, not progress bars (model loading, vLLM progress lines).
        defaults["TQDM_DISABLE"] = "1"
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    # Prefect creates only the last level of its home; make the whole path.
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)


def cmd_run(args: argparse.Namespace) -> int:
    control = "--control" in args.overrides
    overrides = [o for o in args.overrides if o != "--control"]
    try:
        cfg = load_config(args.preset, overrides)
        check_options(cfg.tracking.log_model)
        if control and cfg.pairs.source != "dice":
            raise ConfigError(f"pairs.source: {cfg.pairs.source!r}: --control runs the dice arm and then its "
                              "offline-only control; leave pairs.source at dice")
        if control and not cfg.pairs.budget:
            raise ConfigError("pairs.budget: 0: --control needs a pair budget (pairs per round, e.g. "
                              "--pairs.budget=128) so that both arms train on as many pairs, for as many steps")
    except ValueError as e:  # ConfigError and the tracking section's choices
        print(f"config error: {e}", file=sys.stderr)
        return 2
    prepare_environment(cfg.run_dir)
    from selfalign.tasks.artifacts import RunLocked, run_lock
    from selfalign.tasks.procs import Interrupted, stop_on_signals, stopped_by

    try:
        with run_lock(cfg.run_dir), stop_on_signals():  # a second run on the folder stops at once
            try:
                code = check_inputs(cfg)
                if code:
                    return code
                with temporary_prefect() as server:
                    return _run_arms(cfg, control=control, preset=args.preset, overrides=overrides, server=server)
            except BaseException:
                # The interrupt may come back wrapped (a sub-flow's crash): the signal decides.
                if stopped_by() is None:
                    raise
                return interrupted(Interrupted(stopped_by()))
    except RunLocked as e:
        print(f"run: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        return interrupted(e)
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        # Every output is written to a temporary file and renamed into place: what was there is intact.
        print(f"run: cannot write {e.filename or 'to the disk'}: {e.strerror}. Nothing already written was changed; "
              "free some space or make the folder writable, then run the same command to resume.", file=sys.stderr)
        return 1


# Write failures that a user fixes (a full or read-only disk, permissions), reported in one line.
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def interrupted(e) -> int:
    print(f"run: stopped by {e}. Finished stages are kept: the same command resumes the run.", file=sys.stderr)
    return e.exit_code


@contextmanager
def temporary_prefect():
    """Without a Prefect API configured (PREFECT_API_URL, a profile), a temporary Prefect server for
    the run (`flows.server.TemporaryPrefect`), stopped at the end; otherwise None."""
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        yield None
        return
    from selfalign.flows.server import TemporaryPrefect

    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
    server = TemporaryPrefect(home, timeout=float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 90)))
    try:
        server.start()
        print(f"prefect: temporary server on {server.api_url} (log {server.service.log})", flush=True)
        with server.settings():
            yield server
    finally:
        server.stop()


def _run_arms(cfg, control: bool, preset: str, overrides: list[str], server=None) -> int:
    """The run (and with `control` its offline-only arm after it); prints the tables."""
    ctrl = ctrl_summary = None
    summary = _run(cfg)
    if control and not isinstance(summary, int):
        ctrl = control_config(preset, overrides, cfg)
        print(f"\ncontrol arm: {ctrl.run.name} (offline pairs only, {ctrl.pairs.budget} a round) in {ctrl.run_dir}",
              flush=True)
        from selfalign.tasks.artifacts import run_lock

        with run_lock(ctrl.run_dir):
            ctrl_summary = _run(ctrl)
    if isinstance(summary, int):
        return summary
    _print_summary(cfg, summary)
    if ctrl is not None:
        if isinstance(ctrl_summary, int):
            return ctrl_summary
        _print_summary(ctrl, ctrl_summary)
        from selfalign.flows.compare import arm_rows, format_arms

        print(f"\n{cfg.run.name} against its control {ctrl.run.name}: paired over the eval prompts, 95% intervals")
        print(format_arms(arm_rows(cfg.run_dir, ctrl.run_dir), (cfg.run.name, ctrl.run.name)))
    return 0


def control_config(preset: str, overrides: list[str], cfg):
    """The offline-only arm of `cfg`: the same rounds, seeds and pair budget, offline pairs only, from
    the same pi_0 (round 0 of `cfg`'s run, shared, when that trained it), in `<run dir>-offline`,
    logged to the same MLflow store."""
    from selfalign.flows.run_tracking import tracking_uri

    extra = ["--pairs.source=offline", f"--run.name={cfg.run.name}-offline",
             f"--run.dir={cfg.run_dir.resolve()}-offline", f"--tracking.uri={tracking_uri(cfg)}"]
    ctrl = load_config(preset, overrides + extra)
    if not cfg.model.policy:
        share_start(cfg.run_dir, ctrl.run_dir)
    return ctrl


def share_start(run_dir: Path, control_dir: Path) -> None:
    """Round 0 of a run that trained pi_0, hard-linked (or copied) into its control arm's folder: the
    control's round 0 has the same stage keys, so it finds pi_0 and its evaluation done instead of
    training it again."""
    import shutil

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another filesystem
            shutil.copy2(src, dst)

    src, dst = Path(run_dir) / "round_0", Path(control_dir) / "round_0"
    if src.is_dir() and not dst.exists():
        shutil.copytree(src, dst, copy_function=link, ignore=shutil.ignore_patterns("train"))


def _print_summary(cfg, summary: dict) -> None:
    print()
    print(f"{cfg.run.name}:")
    print(format_table(summary["rounds"]))
    if summary["stopped"]:
        print(f"\nstopped early: {summary['stopped']}")
    print(f"\nfinal model: {summary['final_model']}")
    from selfalign.flows.run_tracking import tracking_uri

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:"):
        print(f"compare rounds: mlflow ui --backend-store-uri {uri}, then {summary.get('runs_table', '')}")
    elif summary.get("runs_table"):
        print(f"compare rounds: {summary['runs_table']}")
    if uri != "none":
        print(f"round table from MLflow: selfalign compare {cfg.run.name} --uri {uri}")


def check_inputs(cfg) -> int:
    """Every dataset read and checked, and the models' tokenizers loaded, before any server or engine
    starts (the flow reuses what was loaded): a bad file, row or model is one message and exit
    status 2 rather than a failed flow run. 0 when all is well."""
    from selfalign.tasks.data import ModelError, check_tokenizers, load_data

    try:
        load_data(cfg)
        check_tokenizers(cfg.model, cfg.train.reference_tokenizers())
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    except ModelError as e:
        print(f"model error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the policy's tokenizer or config cannot be read
        key = "model.policy" if cfg.model.policy else "model.reference"
        print(f"{key} {cfg.model.policy or cfg.model.reference!r} cannot be loaded: {e}", file=sys.stderr)
        return 2
    return 0


def _run(cfg) -> dict | int:
    """The run flow, or the exit status of an error found during it."""
    from selfalign.flows.pipeline import run_flow
    from selfalign.tasks.train import NonFiniteTraining

    try:
        return run_flow(cfg.to_dict())
    except NonFiniteTraining as e:
        print(f"\nrun failed: {e}\nThe round is marked failed and its model was not written. Rerunning the same "
              "command resumes from the last good checkpoint, if any; a changed train config (say a lower train.lr) starts "
              "the round's training again from its input model.", file=sys.stderr)
        return 3


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        parent, rows = compare(args.run, args.uri, args.experiment)
    except CompareError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    info = parent.info
    print(f"run {info.run_name} ({info.run_id}, {info.status})")
    print(format_table(rows))
    if args.against:
        from selfalign.flows.compare import arm_rows, format_arms, run_folder

        try:
            other, _ = compare(args.against, args.uri, args.experiment)
        except CompareError as e:
            print(f"compare: {e}", file=sys.stderr)
            return 2
        print(f"\n{info.run_name} against {other.info.run_name}: paired over the eval prompts, 95% intervals")
        print(format_arms(arm_rows(run_folder(parent), run_folder(other)), (info.run_name, other.info.run_name)))
    if args.csv:
        write_csv(rows, Path(args.csv))
        print(f"wrote {args.csv}")
    if args.markdown:
        Path(args.markdown).write_text(format_markdown(rows), encoding="utf-8")
        print(f"wrote {args.markdown}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from selfalign.flows.config_doc import as_markdown, as_text, reference

    print(as_markdown(reference()) if args.markdown else as_text(reference()), end="" if args.markdown else "\n")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from selfalign.flows.server import serve

    for flag, value, ok, want in (("--prefect-port", args.prefect_port, 1 <= args.prefect_port <= 65535, "a port (1-65535)"),
                                  ("--mlflow-port", args.mlflow_port, 1 <= args.mlflow_port <= 65535, "a port (1-65535)"),
                                  ("--mlflow-workers", args.mlflow_workers, args.mlflow_workers >= 1, "at least 1"),
                                  ("--startup-timeout", args.startup_timeout, args.startup_timeout > 0, "> 0 seconds")):
        if not ok:
            print(f"server: {flag} {value} must be {want}", file=sys.stderr)
            return 2
    if args.prefect_port == args.mlflow_port:
        print(f"server: --prefect-port and --mlflow-port are both {args.mlflow_port}", file=sys.stderr)
        return 2
    home = Path(args.home or os.environ.get("SELFALIGN_HOME", Path.cwd() / ".selfalign")) / "server"
    return serve(home, args.host, args.prefect_port, args.mlflow_port, args.mlflow_backend_uri,
                 args.prefect_database_url, args.mlflow_workers, args.startup_timeout,
                 out=lambda m: print(m, flush=True))


def cmd_train_node(args: argparse.Namespace) -> int:
    """Another node's part of training across nodes (`train.nnodes`): joins each launch of the run's
    train stage, on node 0, until stopped."""
    from selfalign.tasks.procs import Interrupted, stop_on_signals
    from selfalign.tasks.train_nodes import follow

    if args.node_rank < 1:
        print(f"train-node: --node-rank {args.node_rank} must be >= 1 (node 0 runs the pipeline)", file=sys.stderr)
        return 2
    try:
        with stop_on_signals():
            follow(Path(args.run_dir), args.node_rank, log=lambda m: print(m, flush=True), poll=args.poll)
    except ValueError as e:  # this node's rank is beyond the run's train.nnodes
        print(f"train-node: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        return e.exit_code
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from selfalign.flows.deploy import DeployError, deploy, schedules

    try:
        cfg = load_config(args.preset, args.overrides)
        check_options(cfg.tracking.log_model)
        schedules(args.cron, args.timezone)
        bad = [kv for kv in args.env if "=" not in kv]
        if bad:
            raise ValueError(f"--env {bad[0]!r} must look like KEY=VALUE")
        env = dict(kv.split("=", 1) for kv in args.env)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        deploy(cfg, args.name or cfg.run.name, args.pool, args.cron, args.timezone, env)
    except DeployError as e:
        print(f"deploy: {e}", file=sys.stderr)
        return 2
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed: `args.func` runs the command; `args.overrides` holds the config
    overrides of run and deploy."""
    parser = argparse.ArgumentParser(prog="selfalign", description="Iterative self-alignment with DPO implicit rewards (DICE).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run multi-round DICE from a preset")
    p.add_argument("preset", help="preset YAML, e.g. deploy/presets/demo.yaml")
    p.add_argument("overrides", nargs=argparse.REMAINDER,
                   help="--section.key=value overrides (every key: selfalign config); --control also runs the "
                        "offline-only control arm (the same rounds and pair budget on offline pairs alone) and "
                        "compares the two")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("compare", help="print a run's round table from MLflow")
    p.add_argument("run", help="run name (the latest run of that name) or MLflow run id")
    p.add_argument("--uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else runs/<run>/mlflow.db)")
    p.add_argument("--experiment", help="only this MLflow experiment")
    p.add_argument("--csv", help="also write every round metric to this CSV file")
    p.add_argument("--markdown", help="also write the table to this Markdown file")
    p.add_argument("--against", help="another run (e.g. the control arm) evaluated on the same prompts: each "
                   "rate side by side, with the paired difference and its 95%% interval")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("config", help="list every config key with its type, default and meaning")
    p.add_argument("--markdown", action="store_true", help="as the Markdown of docs/config.md")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("server", help="start a Prefect server and an MLflow tracking server; Ctrl-C stops both")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--home", help="stores and logs go to <home>/server (default: SELFALIGN_HOME, else ./.selfalign)")
    p.add_argument("--mlflow-backend-uri", default="", help="MLflow store, e.g. postgresql://user:pw@host/db "
                   "(default: SQLite under the home)")
    p.add_argument("--prefect-database-url", default="", help="Prefect database, e.g. "
                   "postgresql+asyncpg://user:pw@host/db (default: SQLite under the home)")
    p.add_argument("--mlflow-workers", type=int, default=1)
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for both to be healthy")
    p.set_defaults(func=cmd_server)
    p = sub.add_parser("train-node", help="on another node of train.nnodes: join each round's training of a run "
                       "(node 0 runs the pipeline); runs until stopped")
    p.add_argument("run_dir", help="the run's folder on the shared filesystem (run.dir, else runs/<run.name>), or a "
                   "folder holding several runs (a continual chain's)")
    p.add_argument("--node-rank", type=int, required=True, help="this node's rank, 1 .. train.nnodes - 1")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between looks at the run folder (default: 1)")
    p.set_defaults(func=cmd_train_node)
    p = sub.add_parser("deploy", help="register the run flow as a Prefect deployment on a process work pool",
                       usage="selfalign deploy PRESET [--section.key=value ...] [--cron CRON] [--name NAME] ...")
    p.add_argument("preset", help="preset YAML; --section.key=value overrides may follow")
    p.add_argument("--name", help="deployment name (default: run.name)")
    p.add_argument("--pool", default="selfalign", help="process work pool, created if missing (default: selfalign)")
    p.add_argument("--cron", help='schedule, e.g. "0 3 * * *" (default: none, runs on demand)')
    p.add_argument("--timezone", help="time zone of the cron schedule, e.g. Europe/Paris (default: UTC)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the flow run's process (repeatable)")
    p.set_defaults(func=cmd_deploy)
    # `deploy` takes its config overrides anywhere on the line; the other commands take none loose.
    args, extra = parser.parse_known_args(argv)
    if args.command == "deploy":
        args.overrides = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:  # raised past a command's own checks, e.g. from inside the flow
        kind = "data error" if isinstance(e, DataError) else "config error"
        print(f"{args.command}: {kind}: {e}", file=sys.stderr)
        return 2


def entry() -> None:
    """The `selfalign` console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
