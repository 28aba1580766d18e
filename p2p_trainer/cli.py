"""`p2p-trainer train | bootstrap | status | export | plan`.

Bad input (a missing file, an unknown key, a wrong value, a malformed multiaddr) ends with one
line naming it and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from p2p_trainer.config import ConfigError, SwarmConfig, check_multiaddr_syntax
from p2p_trainer.config_file import load_config, section_fields
from p2p_trainer.plan_cli import add_arguments as plan_arguments

USAGE_ERROR = 2

# top-level flags of the design's CLI contract, and the config key each one sets
_SHORTCUTS = {
    "initial_peers": "swarm.initial_peers",
    "host_maddrs": "swarm.host_maddrs",
    "announce_maddrs": "swarm.announce_maddrs",
    "identity": "swarm.identity",
    "run_id": "swarm.run_id",
    "metrics": "log.metrics",
    "client_mode": "swarm.client_mode",
    "resume": "checkpoint.resume",
}


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    current = None
    group = parser
    for section, f in section_fields():
        if section != current:
            group, current = parser.add_argument_group(f"[{section}] section"), section
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        is_list = isinstance(default, list)
        group.add_argument(
            f"--{section}.{f.name}",
            dest=f"{section}.{f.name}",
            default=None,
            nargs="+" if is_list else None,
            metavar=f.name.upper(),
            help=f"{f.metadata['help']} (default: {default!r})",
        )


def _swarm_flags(parser: argparse.ArgumentParser, *, identity_help: str) -> None:
    parser.add_argument(
        "--initial-peers", nargs="+", metavar="MADDR", help="multiaddrs of any peers of the swarm"
    )
    parser.add_argument("--host-maddrs", nargs="+", metavar="MADDR", help="multiaddrs to listen on")
    parser.add_argument("--announce-maddrs", nargs="+", metavar="MADDR", help="multiaddrs others should dial")
    parser.add_argument("--identity", metavar="KEY", help=identity_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2p-trainer", description="Train LLMs peer to peer with DiLoCo.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="train as one peer of a swarm (starts a new swarm without --initial-peers)"
    )
    train.add_argument("--config", metavar="F.toml", help="TOML config (default: built-in debug defaults)")
    _swarm_flags(train, identity_help="private key file: keeps this peer's id across restarts")
    train.add_argument("--run-id", help="name of the training run")
    train.add_argument("--metrics", metavar="OUT.jsonl", help="write metrics records to this JSONL file")
    train.add_argument("--max-outer-steps", type=int, metavar="N", help="stop after N outer steps")
    train.add_argument(
        "--client-mode",
        action="store_true",
        default=None,
        help="outgoing connections only (behind NAT): contributes, reduces no slice",
    )
    train.add_argument("--resume", action="store_true", default=None, help="resume from the last checkpoint")
    _add_config_options(train)

    boot = sub.add_parser("bootstrap", help="run the long-lived initial peer (DHT only)")
    _swarm_flags(boot, identity_help="private key file: keeps the bootstrap peer's id across restarts")
    boot.add_argument("--serve", metavar="HOST:PORT",
                      help="also serve the run's live status page here (as `status --serve`)")
    boot.add_argument("--run-id", help=f"run the status page shows (default: {SwarmConfig().run_id!r})")
    # the old flag: now the same page, on 127.0.0.1
    boot.add_argument("--status-port", type=int, default=0, metavar="PORT", help=argparse.SUPPRESS)

    status = sub.add_parser("status", help="show the live peers and the run",
                            epilog="exit code: 0 the run was found, 1 no live peer of the run, "
                                   "2 bad input or the swarm unreachable")
    status.add_argument("--initial-peers", nargs="+", metavar="MADDR", required=True)
    status.add_argument("--run-id",
                        help=f"run to show (default: {SwarmConfig().run_id!r}; the DHT cannot list runs)")
    shown = status.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print one JSON object")
    shown.add_argument("--serve", metavar="HOST:PORT",
                       help="stay and serve a live web page of the run here (port 0: any free port) "
                            "until Ctrl+C or SIGTERM")

    export = sub.add_parser("export", help="write a Hugging Face model folder from a checkpoint")
    export.add_argument(
        "checkpoint", help="checkpoint file (ckpt-*.safetensors) or a checkpoint folder (newest is used)"
    )
    export.add_argument("out_dir", help="output folder (safetensors + config + tokenizer)")

    plan_arguments(sub.add_parser("plan", help="a config's memory, bytes per round and compute "
                                  "utilization over a given link, on paper"))
    return parser


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """`--section.key` values and the design's shortcut flags, as `section.key -> value`."""
    overrides: dict[str, Any] = {}
    for section, f in section_fields():
        value = getattr(args, f"{section}.{f.name}")
        if value is not None:
            overrides[f"{section}.{f.name}"] = _list_value(value, f) if isinstance(value, list) else value
    for flag, key in _SHORTCUTS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    return overrides


def _list_value(values: list[str], f) -> Any:
    if len(values) == 1 and values[0].startswith("["):
        return values[0]  # a TOML array, parsed by the config loader
    default = f.default_factory()
    if default and isinstance(default[0], (int, float)):
        try:
            return [float(v) for v in values]
        except ValueError:
            raise ConfigError(f"--{f.name}: expected numbers, got {values!r}") from None
    return values


def _train(args: argparse.Namespace, *, swarm_factory=None, inner_factory=None) -> int:
    cfg = load_config(args.config, train_overrides(args))
    if args.max_outer_steps is not None and args.max_outer_steps < 0:
        raise ConfigError(f"--max-outer-steps={args.max_outer_steps} must be >= 0")
    from p2p_trainer.run import train  # heavy imports only once the config is known to be good

    return train(cfg, max_outer_steps=args.max_outer_steps, swarm_factory=swarm_factory,
                 inner_factory=inner_factory)  # fmt: skip


def _export(args: argparse.Namespace) -> int:
    from p2p_trainer.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir)
    print(f"exported to {out}")
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    check_multiaddr_syntax(args.initial_peers or [], "--initial-peers")
    check_multiaddr_syntax(args.host_maddrs, "--host-maddrs")
    check_multiaddr_syntax(args.announce_maddrs or [], "--announce-maddrs")
    from p2p_trainer.bootstrap import run_bootstrap

    return run_bootstrap(
        initial_peers=args.initial_peers or [],
        host_maddrs=args.host_maddrs,
        announce_maddrs=args.announce_maddrs or [],
        identity=args.identity or "",
        serve=args.serve or (f"127.0.0.1:{args.status_port}" if args.status_port else None),
        run_id=args.run_id,
    )


def _status(args: argparse.Namespace) -> int:
    from p2p_trainer.status import run_status

    return run_status(initial_peers=args.initial_peers, run_id=args.run_id, as_json=args.json,
                      serve=args.serve)


def _plan(args: argparse.Namespace) -> int:
    from p2p_trainer.plan_cli import run_plan

    return run_plan(args)


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConfigError, FileNotFoundError]
    # a SwarmError can only come once the swarm is imported: a bad flag must not wait for that import
    swarm_errors = sys.modules.get("p2p_trainer.swarm.errors")
    if swarm_errors is not None:
        errors.append(swarm_errors.SwarmError)
    return tuple(errors)


def main(argv: list[str] | None = None, *, swarm_factory=None, inner_factory=None) -> int:
    """The command line. ``swarm_factory``/``inner_factory``: the Trainer's test seams (see
    ``p2p_trainer.testing.peer``), for ``train`` only."""
    args = build_parser().parse_args(argv)
    handlers = {"export": _export, "bootstrap": _bootstrap, "status": _status, "plan": _plan}
    try:
        if args.command == "train":
            return _train(args, swarm_factory=swarm_factory, inner_factory=inner_factory)
        return handlers[args.command](args)
    except _user_errors() as e:
        print(f"p2p-trainer {args.command}: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
