"""`p2p-trainer plan`'s command line and its text: the flags, their checks (one-line errors), and
the plan printed as tables; the model itself is ``plan``."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from p2p_trainer.config import ConfigError
from p2p_trainer.config_file import load_config
from p2p_trainer.plan import (
    GB,
    Hardware,
    Plan,
    check_row,
    count_params,
    intellect1_comparison,
    make_plan,
    netns_rows,
)

# ---------------------------------------------------------------- the command line
# Hardware field -> (metavar, type, may be 0, help); the flag is the field's name with dashes.
_HW_FLAGS = {
    "gpus": ("N", int, True, "GPUs of one peer, FSDP2 over them; 0 = a CPU peer"),
    "link_mbit": ("B", float, False, "each direction of every peer's link, Mbit/s"),
    "peers": ("K", int, False, "all-reduce group size"),
    "rtt_ms": ("MS", float, True, "round-trip time between peers"),
    "codec_gbps": ("G", float, False, "GB/s of fp32 one int8 encode or decode pass handles; the default "
                   "was measured on 2 cores"),
    "gpu_mem_gb": ("GB", float, False, "memory of one GPU"),
    "gpu_tflops": ("T", float, False, "peak bf16 TFLOP/s of one GPU (for the MFU line)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Numbers are read as text and checked here, so a bad one gets the CLI's one-line error."""
    parser.add_argument("--config", required=True, metavar="F.toml", help="config file or preset name")
    for name, (metavar, _, _, text) in _HW_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, metavar=metavar, help=f"{text} (default {getattr(Hardware(), name):g})")
    parser.add_argument("--step-s", metavar="S", help="seconds per inner step of this peer (default: "
                        "measured for debug, INTELLECT-1's pace for 10b-intellect1; required for the others)")
    parser.add_argument("--steps-per-round", metavar="H", help="inner steps per round (default: the config)")
    parser.add_argument("--check", metavar="RESULTS.json", help="instead, predict the netns utilization rows "
                        "of a bench results file and print each prediction beside its measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _number(flag: str, text: str, kind: type, *, zero_ok: bool = False) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{flag}={text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{flag}={text!r} must be {'>= 0' if zero_ok else '> 0'}")
    return value


def hardware_from_args(args: argparse.Namespace) -> Hardware:
    given = {}
    for name, (_, kind, zero_ok, _) in _HW_FLAGS.items():
        text = getattr(args, name)
        if text is not None:
            given[name] = _number("--" + name.replace("_", "-"), text, kind, zero_ok=zero_ok)
    return Hardware(**given)


def run_plan(args: argparse.Namespace) -> int:
    hw = hardware_from_args(args)
    step_s = None if args.step_s is None else _number("--step-s", args.step_s, float)
    steps = None
    if args.steps_per_round is not None:
        steps = int(_number("--steps-per-round", args.steps_per_round, int))
    cfg = load_config(args.config)
    if args.check:
        checked = [check_row(r, count_params(cfg)) for r in _measured_rows(args.check)]
        text = "\n".join(_table([list(checked[0]), *[[str(v) for v in c.values()] for c in checked]]))
        print(json.dumps(checked, indent=1) if args.json else text)
        return 0
    plan = make_plan(cfg, hw, config=args.config, step_s=step_s, steps=steps)
    print(json.dumps(plan.to_json(), indent=1) if args.json else format_plan(plan))
    return 0


def _measured_rows(path: str) -> list[dict]:
    try:
        rows = netns_rows(json.loads(Path(path).read_text()))
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"--check {path}: not a bench results file ({e.__class__.__name__})") from None
    if not rows:
        raise ConfigError(f"--check {path}: no netns utilization rows (they come from `make bench-long`)")
    return rows


# ---------------------------------------------------------------- text
def _table(rows: list[list[str]], *, numbers: bool = True) -> list[str]:
    """Aligned columns; with ``numbers`` every column but the first is right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    align = lambda i, c, w: c.rjust(w) if numbers and i else c.ljust(w)
    return ["  " + "  ".join(align(i, c, w) for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in rows]


def _size(n: int) -> str:
    return f"{n / GB:.2f}B" if n >= GB else f"{n / 1e6:.1f}M"


def format_plan(plan: Plan) -> str:
    hw, ranks = plan.hardware, max(1, plan.hardware.gpus)
    where = f"{hw.gpus} GPU{'s' * (hw.gpus != 1)}" if hw.gpus else "a CPU peer"
    out = [f"plan for {plan.config}: {_size(plan.params)} parameters, vocab {plan.vocab}",
           f"peer: {where}; {plan.steps_per_round} inner steps per round at {plan.step_s:g} s/step "
           f"({plan.step_source})",
           f"link: {hw.link_mbit:g} Mbit/s each way, RTT {hw.rtt_ms:g} ms, {hw.peers} peers per all-reduce "
           f"group; codec CPU {hw.codec_gbps:g} GB/s per pass",
           "", f"memory per {'GPU' if hw.gpus else 'rank'}{f' (FSDP2 over {ranks})' * (ranks > 1)}, GB"]
    out += _table([[k, f"{v / GB:.2f}"] for k, v in plan.gpu.items()])
    if hw.gpus and plan.gpu["total"] > hw.gpu_mem_gb * GB:
        out.append(f"  does NOT fit in {hw.gpu_mem_gb:g} GB (inner.py has no activation checkpointing; "
                   "a smaller data.micro_batch_size shrinks the activations)")
    elif hw.gpus:
        out.append(f"  fits in {hw.gpu_mem_gb:g} GB")
    out += ["", f"CPU memory per local rank (issue 13: outer state sharded over {ranks}), GB"]
    out += _table([[k, f"{v / GB:.2f}"] for k, v in plan.cpu.items()])
    extra = plan.cpu_rank0_extra / GB
    out += [f"  rank 0 also holds the round's encoded average ({plan.codec}): {extra:.2f}", "",
            f"one round per peer: each direction of its link carries 2(k-1)/k of the payload, "
            f"k = {hw.peers}; * = the config's codec"]
    rows = [["codec", "payload MB", "wire MB", "compute s", "transfer s", "codec s", "latency s", "round s",
             "util %", "overlapped %"]]
    for name, r in plan.rounds.items():
        rows.append([name + "*" * (name == plan.codec), f"{r.payload_mb:,.2f}", f"{r.wire_mb:,.2f}",
                     f"{r.compute_s:,.1f}", f"{r.transfer_s:,.2f}", f"{r.codec_s:,.2f}", f"{r.latency_s:.2f}",
                     f"{r.round_s:,.1f}", f"{r.utilization_pct:.1f}", f"{r.overlapped_utilization_pct:.1f}"])
    out += _table(rows)
    out.append("  util: blocking outer step (today); overlapped: --outer.overlap, the transfer hides behind "
               "the next round's compute")
    comparison = intellect1_comparison(plan)
    if comparison:
        out += ["", "beside INTELLECT-1's published figures (arXiv 2412.01152):"]
        out += _table([["", "INTELLECT-1", "this plan"], *[list(c) for c in comparison]], numbers=False)
    return "\n".join(out)
