"""Held-out loss at equal tokens: DiLoCo against data parallel and one worker, from one shared warm start.

    python -m bench.bench_convergence [--budget 200] [--warm 400] [--seeds 0 1]

The DiLoCo paper's protocol at CPU scale: one worker trains the debug-size model (byte-level Llama,
~1.3M parameters, Shakespeare, batch 16 x 128, AdamW lr 3e-3 with WSD) for ``warm`` steps; every
method then starts from that checkpoint (weights and AdamW state) and spends the same tokens,
``k x budget`` batches of 16 sequences:

- one worker given a quarter of the tokens (``budget`` steps) and one taking 4x the steps;
- data parallel with a 4x batch: 2 processes x 32 sequences, gradients summed by a real
  ``torch.distributed`` gloo all-reduce every step (hooks on the parameters), ``budget`` steps;
- DiLoCo, k=4 workers, H in {10, 50}: an in-process simulation that calls the swarm's own pieces:
  ``p2p_trainer.inner.InnerLoop`` per worker, ``p2p_trainer.diloco.DiLoCo`` for the outer step, and
  the reducer's arithmetic (``p2p_trainer.testing.simulate.swarm_average``, the swarm's slices and aggregation
  with the real codec: every part encoded and decoded, fp32 weighted accumulation, the average
  encoded once and decoded). Outer (lr, momentum) is swept per H with fp32; int8 runs at each H's best;
- the same DiLoCo k=4, H=50, int8 row over the real swarm: four ``p2p-trainer train`` processes on
  loopback, resumed (``--checkpoint.dir D --resume``) from checkpoints built from the warm start,
  worker i's data order equal to simulated worker i's.

Workers i=0..3 read data orders 0..3 (the single-worker rows read order 0, data parallel rank r
orders 2r and 2r+1), so every method sees the same batches. Jobs run as separate processes, two at a
time, one thread each. Loss curves go to ``bench/plots/convergence.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench._procs import free_port

K = 4
PLOT = Path("bench/plots/convergence.png")
SWEEP = [(0.7, 0.9), (0.5, 0.5), (1.0, 0.0)]
HS = (10, 50)
WARM_ORDER = 999  # data order of the warm-start worker, unused by the methods


def _order(seed: int, i: int) -> int:
    return 1 + i + 100 * seed


# ---------------------------------------------------------------- shared setup (inside job processes)
def overrides(total_steps: int) -> dict:
    return {
        "data.sources": [{"name": "shakespeare", "weight": 1.0}],
        "data.eval_batches": 16,
        "inner.warmup_steps": 10,
        "inner.total_steps": total_steps,
        "inner.decay_steps": total_steps // 5,  # the decay starts after the shared warm start
        "log.level": "WARNING",
    }


def _setup(total_steps: int):
    import torch

    from p2p_trainer.config_file import load_config
    from p2p_trainer.data import build_tokenizer, eval_batches

    torch.set_num_threads(1)
    cfg = load_config("configs/debug.toml", overrides(total_steps))
    tok = build_tokenizer(cfg.data)
    return cfg, tok, eval_batches(cfg.data, tok, cfg.model.seq_len)


def _inner(cfg, tok, warm: dict | None, micro: int = 16):
    from p2p_trainer.inner import InnerLoop
    from p2p_trainer.model import build_model

    loop = InnerLoop(build_model(cfg.model, len(tok), seed=cfg.inner.seed), cfg.inner, micro)
    if warm is not None:
        loop.import_params(warm["params"])
        # a private copy: Optimizer.load_state_dict keeps the tensors it is given; workers must not share them
        loop.load_state_dict(copy.deepcopy(warm["inner"]))
    return loop


def _stream(cfg, tok, order: int):
    from p2p_trainer.data import TokenStream

    return TokenStream(cfg.data, tok, cfg.model.seq_len, peer_seed=order)


def _load_warm(path: str) -> dict:
    import torch

    return torch.load(path, weights_only=False)


# ---------------------------------------------------------------- jobs
def job_warm(spec: dict) -> dict:
    import torch

    cfg, tok, ev = _setup(spec["warm"] + spec["budget"])
    loop, stream = _inner(cfg, tok, None), _stream(cfg, tok, WARM_ORDER)
    for _ in range(spec["warm"]):
        loop.step(stream.next_batch())
    torch.save({"params": loop.export_params(), "inner": loop.state_dict()}, spec["warm_path"])
    return {"final": loop.evaluate(ev)}


def job_single(spec: dict) -> dict:
    steps, tokens_per_step = spec["steps"], 16 * 128
    cfg, tok, ev = _setup(spec["warm"] + steps)
    loop, stream = _inner(cfg, tok, _load_warm(spec["warm_path"])), _stream(cfg, tok, _order(spec["seed"], 0))
    every = max(1, steps // 4)
    curve = [(0, loop.evaluate(ev))]
    for s in range(1, steps + 1):
        loop.step(stream.next_batch())
        if s % every == 0 or s == steps:
            curve.append((s * tokens_per_step, loop.evaluate(ev)))
    return {"curve": curve, "final": curve[-1][1]}


def job_dp(spec: dict) -> dict:
    """One rank of data parallel: 32 sequences per rank, gradients all-reduced (gloo) every step."""
    import torch
    import torch.distributed as dist

    from p2p_trainer.diloco import params_sha256

    rank, world, steps = spec["rank"], spec["world"], spec["budget"]
    cfg, tok, ev = _setup(spec["warm"] + steps)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec['port']}", rank=rank,
                            world_size=world)
    per_rank = K // world
    loop = _inner(cfg, tok, _load_warm(spec["warm_path"]), micro=16 * per_rank)

    def average(p: torch.Tensor) -> None:  # fires once per step (one backward per step)
        dist.all_reduce(p.grad)
        p.grad.div_(world)

    for p in loop.model.parameters():
        p.register_post_accumulate_grad_hook(average)
    streams = [_stream(cfg, tok, _order(spec["seed"], per_rank * rank + j)) for j in range(per_rank)]
    every, tokens_per_step = max(1, steps // 4), K * 16 * 128
    curve = [(0, loop.evaluate(ev))] if rank == 0 else []
    for s in range(1, steps + 1):
        loop.step(torch.cat([st.next_batch() for st in streams]))
        if rank == 0 and (s % every == 0 or s == steps):
            curve.append((s * tokens_per_step, loop.evaluate(ev)))
    hashes = [None] * world
    dist.all_gather_object(hashes, params_sha256(loop.export_params()))
    dist.destroy_process_group()
    return {"curve": curve, "final": curve[-1][1] if curve else None,
            "replicas_identical": len(set(hashes)) == 1}


def _sent(part, codec, k: int):
    """What ``part`` decodes to after the codec, slice by slice as the swarm's members send it."""
    import torch

    from p2p_trainer.swarm.partition import slice_bounds

    out = torch.empty_like(part)
    for lo, hi in slice_bounds(part.numel(), k):
        out[lo:hi] = codec.decode(codec.encode(part[lo:hi].contiguous()), hi - lo)
    return out


def _rows(x, chunk: int = 4096):
    import torch

    return torch.nn.functional.pad(x, (0, (-x.numel()) % chunk)).view(-1, chunk)


def _top_k_exact(part, k: int, chunk: int = 4096, shared=None):
    """A top-k code at its best with ``k`` of each ``chunk``: the top-k entries of each chunk, exact
    fp32, the rest zero; with ``shared`` (positions per chunk), the entries there too, and the
    top-k of the rest."""
    import torch

    rows = _rows(part, chunk)
    keep = torch.zeros_like(rows, dtype=torch.bool)
    if shared is not None:
        keep.scatter_(1, shared, True)
    keep.scatter_(1, rows.masked_fill(keep, 0.0).abs().topk(k, dim=1).indices, True)
    return rows.masked_fill(~keep, 0.0).flatten()[: part.numel()]


def job_diloco(spec: dict) -> dict:
    """k simulated workers over the swarm's own pieces. ``aggregation`` (mean | clip), ``overlap``
    (none | delayed | eager, as ``OuterSync`` does them) and ``error_feedback`` as in the trainer's
    config; the reducers' arithmetic is ``testing.simulate.swarm_average``. Beside the trainer's
    settings, for measuring alternatives: ``sparse_chunk``, ``sparse_k``, ``sparse_bits``,
    ``eager_lookahead`` (the share of the outer step an ``eager`` phase starts with; the trainer's
    ``EAGER_LOOKAHEAD`` by default), ``return_k`` (the average goes back with another k),
    ``full_return`` (each worker's residual takes its sent part minus the applied average
    everywhere, not only where the average is zero), ``ef_decay`` (the share of the residual that
    joins the next part, the trainer's ``outer.ef_decay``)
    and ``top_k_bound``; with ``shared_k`` too, a bound for shared positions: each worker sends the
    exact values at the ``shared_k`` largest positions of each chunk of the previous round's average
    and its own top ``top_k_bound`` of the rest (the first round: its own top ``first_k``)."""
    import torch

    from p2p_trainer.codec import get_codec
    from p2p_trainer.config import OuterConfig
    from p2p_trainer.diloco import DiLoCo
    from p2p_trainer.outer_sync import EAGER_LOOKAHEAD
    from p2p_trainer.testing.simulate import swarm_average

    h, budget = spec["H"], spec["budget"]
    mode, overlap = spec.get("aggregation", "mean"), spec.get("overlap", "none")
    cfg, tok, ev = _setup(spec["warm"] + budget)
    warm = _load_warm(spec["warm_path"])
    workers = [_inner(cfg, tok, warm) for _ in range(K)]
    streams = [_stream(cfg, tok, _order(spec["seed"], i)) for i in range(K)]
    outer = OuterConfig(lr=spec["outer_lr"], momentum=spec["momentum"], nesterov=True)
    diloco = DiLoCo(warm["params"], outer)
    from p2p_trainer.codec.sparse_format import SparseParams

    default = SparseParams()
    sparse = SparseParams(spec.get("sparse_chunk", default.chunk_size), spec.get("sparse_k", default.k),
                          spec.get("sparse_bits", default.value_bits))  # fmt: skip
    codec = get_codec(spec["codec"], sparse=sparse)
    # the reducers send the average back with a different k (an asymmetric code, not the swarm's)
    back = None
    if "return_k" in spec:
        returned = SparseParams(sparse.chunk_size, spec["return_k"], sparse.value_bits)
        back = get_codec("sparse", sparse=returned)
    ef = spec.get("error_feedback", spec["codec"] == "sparse")
    ef_return = spec.get("ef_return", ef)
    decay = spec.get("ef_decay", 1.0)  # the share of a residual that joins the next part
    bound_k = spec.get("top_k_bound")  # instead of the codec: the best any top-k code could send
    assert not bound_k or ef, "the top-k bound keeps what it does not send (error feedback)"
    weights = [float(h * 16 * 128)] * K
    residual: list = [None] * K
    delta: list = [None] * K
    sent: list = [None] * K
    rounds, every = budget // h, max(1, 50 // h)
    curve = [(0, workers[0].evaluate(ev))]
    shared = None
    pending = None  # overlap: the round in flight (its average, our sents), applied at the next boundary
    start: list = [None] * K  # overlap eager: where each worker's phase started
    for r in range(1, rounds + 1):
        parts = []
        for i, (loop, stream) in enumerate(zip(workers, streams, strict=True)):
            for _ in range(h):
                loop.step(stream.next_batch())
            if start[i] is not None:  # eager: the phase's own progress, from where it started
                delta[i] = start[i] - loop.export_params()
            else:
                delta[i] = diloco.pseudo_gradient(loop.export_params())
            part = delta[i] + decay * residual[i] if ef and residual[i] is not None else delta[i]
            if ef:  # what the codec does not send of our part carries into the next round
                if spec.get("shared_k"):  # (the first round has no shared positions yet)
                    own = bound_k if shared is not None else spec["first_k"]
                    sent[i] = _top_k_exact(part, own, shared=shared)
                else:
                    sent[i] = _top_k_exact(part, bound_k) if bound_k else _sent(part, codec, K)
                residual[i] = part - sent[i]
            parts.append(part)
        if bound_k:  # the exact mean of the parts' exact top-k: no rounding, and no return leg dropping any
            average = sum(sent) / K
            if spec.get("shared_k"):  # next round's shared positions: the largest of this average
                shared = _rows(average).abs().topk(spec["shared_k"], dim=1).indices
        else:
            average = swarm_average(parts, weights, codec=codec, mode=mode, return_codec=back)
        if overlap == "none":
            theta, applied = diloco.apply(average), (average, sent)
        else:
            if pending is None:
                diloco.skip()  # the first overlapped boundary has nothing to apply yet
            else:
                diloco.apply(pending[0])
            applied, pending, theta = pending, (average, list(sent)), diloco.master
        if ef_return and applied is not None:  # what we sent where the applied average is zero comes
            for i in range(K):  # back (``OuterState._apply_window``)
                if spec.get("full_return"):  # not the trainer's rule: sent minus applied everywhere
                    residual[i] += applied[1][i] - applied[0]
                else:
                    residual[i] += torch.where(applied[0] == 0, applied[1][i], 0.0)
        for i, loop in enumerate(workers):
            if overlap == "eager":  # θ moved on by our pseudo-gradient in flight, at the outer lr
                start[i] = theta - spec.get("eager_lookahead", EAGER_LOOKAHEAD) * outer.lr * delta[i]
                loop.import_params(start[i])
            else:
                loop.import_params(theta)
        if r % every == 0 or r == rounds:
            curve.append((r * h * K * 16 * 128, workers[0].evaluate(ev)))
    out = {"curve": curve, "final": curve[-1][1], "sha256": diloco.sha256()}
    if pending is not None:  # as a run that goes on would: the round in flight lands one boundary later
        out["final_at_last_boundary"] = out["final"]
        workers[0].import_params(diloco.apply(pending[0]))
        out["final"] = workers[0].evaluate(ev)
        curve[-1] = (curve[-1][0], out["final"])
    return out


JOBS = {"warm": job_warm, "single": job_single, "dp": job_dp, "diloco": job_diloco}


# ---------------------------------------------------------------- scheduling (parent process)
def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _launch(spec: dict, work: Path, name: str) -> subprocess.Popen:
    path = work / f"{name}.json"
    path.write_text(json.dumps(dict(spec, out=str(work / f"{name}.out.json"))))
    return subprocess.Popen([sys.executable, "-m", "bench.bench_convergence", "--job", str(path)],
                            stdout=open(work / f"{name}.log", "w"), stderr=subprocess.STDOUT, env=_env())


def _collect(name: str, procs: list[subprocess.Popen], work: Path, t0: float) -> dict:
    outs = []
    for r, p in enumerate(procs):
        part = name if len(procs) == 1 else f"{name}-r{r}"
        if p.returncode != 0:
            raise RuntimeError(f"job {part} failed: {(work / f'{part}.log').read_text()[-3000:]}")
        outs.append(json.loads((work / f"{part}.out.json").read_text()))
    out = dict(outs[0], wall_s=round(time.time() - t0, 1))
    if len(outs) > 1:
        out["replicas_identical"] = all(o["replicas_identical"] for o in outs)
    print(f"  [{time.strftime('%H:%M:%S')}] {name}: held-out loss {out.get('final'):.4f} ({out['wall_s']} s)",
          flush=True)
    return out


Job = tuple[str, Callable[[dict], list[dict]], tuple[str, ...]]  # name, specs (from results so far), deps


def schedule(jobs: list[Job], work: Path, slots: int, res: dict) -> None:
    """Run the jobs as processes, at most ``slots`` at once, in list order once their deps are done (a
    job of several processes, data parallel's ranks, waits until it fits rather than be overtaken)."""
    pending, running = list(jobs), {}
    try:
        while pending or running:
            for name, (procs, t0) in list(running.items()):
                if all(p.poll() is not None for p in procs):
                    del running[name]
                    res[name] = _collect(name, procs, work, t0)
            used = sum(len(procs) for procs, _ in running.values())
            for job in list(pending):
                name, make, deps = job
                if not all(d in res for d in deps):
                    continue
                specs = make(res)
                if used + len(specs) > slots:
                    break
                parts = [name] if len(specs) == 1 else [f"{name}-r{r}" for r in range(len(specs))]
                procs = [_launch(spec, work, part) for spec, part in zip(specs, parts, strict=True)]
                running[name] = (procs, time.time())
                used += len(specs)
                pending.remove(job)
            if pending and not running and not any(all(d in res for d in deps) for _, _, deps in pending):
                raise RuntimeError(f"jobs waiting on results that never come: {[j[0] for j in pending]}")
            time.sleep(0.5)
    finally:
        for procs, _ in running.values():
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    p.wait(timeout=30)


def run_swarm(base: dict, work: Path, outer: tuple[float, float], h: int = 50, codec: str = "int8") -> dict:
    """DiLoCo over the real swarm: 4 CLI trainers on loopback, resumed from checkpoints of the warm start."""
    import torch

    from p2p_trainer import checkpoint
    from p2p_trainer.config_file import load_config
    from p2p_trainer.contracts import run_fingerprint
    from p2p_trainer.data import TokenStream, build_tokenizer, tokenizer_sha256
    from p2p_trainer.metrics import read_metrics
    from p2p_trainer.outer_sync import OuterSync
    from p2p_trainer.ranks import LocalRanks

    budget, warm_steps = base["budget"], base["warm"]
    t0 = time.time()
    flags = {**overrides(warm_steps + budget), "inner.steps_per_round": h, "outer.lr": outer[0],
             "outer.momentum": outer[1], "swarm.codec": codec, "swarm.run_id": "conv-swarm",
             "swarm.min_group_size": K, "swarm.target_group_size": K, "swarm.matchmaking_timeout": 600.0,
             "swarm.allreduce_timeout": 60.0, "checkpoint.every": 1000, "log.eval_every": 1,
             "log.progress_bar": False}
    cfg = load_config("configs/debug.toml", flags)
    tok = build_tokenizer(cfg.data)
    warm = torch.load(base["warm_path"], weights_only=False)
    argv_flags = []
    for key, value in flags.items():
        if key == "data.sources":
            value = "[" + ", ".join(f'{{name = "{s["name"]}", weight = {s["weight"]}}}' for s in value) + "]"
        argv_flags += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    procs, maddr = [], None
    fingerprint = run_fingerprint(cfg, tokenizer_sha256(tok), len(tok))
    try:
        for i in range(K):
            folder = work / f"swarm-ckpt-{i}"
            # the checkpoint a trainer would write at outer step 0 holding the warm start
            outer = OuterSync(LocalRanks(0, 1, torch.device("cpu")), _inner(cfg, tok, warm), None, cfg.outer)
            seed = _order(base["seed"], i)
            data = TokenStream(cfg.data, tok, cfg.model.seq_len, peer_seed=seed).state_dict()
            extra = checkpoint.run_metadata(data, cfg.to_dict(), fingerprint)
            checkpoint.save_checkpoint(folder, 0, lambda f, o=outer, e=extra: o.write_checkpoint(f, e))
            outer.close()
            log = work / f"swarm-{i}.log"
            cmd = [sys.executable, "-m", "p2p_trainer.cli", "train", "--config", "configs/debug.toml",
                   "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--metrics", str(work / f"swarm-{i}.jsonl"),
                   "--max-outer-steps", str(budget // h), "--checkpoint.dir", str(folder), "--resume",
                   *argv_flags, *(["--initial-peers", maddr] if maddr else [])]
            procs.append(subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=_env()))
            if maddr is None:
                maddr = _wait_for(log, "peer address:", procs[0])
        for i, p in enumerate(procs):
            if p.wait(timeout=3600) != 0:
                tail = (work / f"swarm-{i}.log").read_text()[-3000:]
                raise RuntimeError(f"swarm trainer {i} failed: {tail}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
    evals = read_metrics(work / "swarm-0.jsonl", "eval")
    hashes = {read_metrics(work / f"swarm-{i}.jsonl", "outer_step")[-1]["params_sha256"] for i in range(K)}
    outer_steps = read_metrics(work / "swarm-0.jsonl", "outer_step")
    out = {"curve": [(e["outer_step"] * h * K * 16 * 128, e["eval_loss"]) for e in evals],
           "final": evals[-1]["eval_loss"], "replicas_identical": len(hashes) == 1,
           "group_sizes": [r["group_size"] for r in outer_steps], "wall_s": round(time.time() - t0, 1)}
    print(f"  [{time.strftime('%H:%M:%S')}] swarm: held-out loss {out['final']:.4f} ({out['wall_s']} s)",
          flush=True)
    return out


def _wait_for(log: Path, prefix: str, proc: subprocess.Popen, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"no {prefix!r} in {log}: {log.read_text()[-2000:]}")


# ---------------------------------------------------------------- the table
def _row(method: str, out: dict, dp: float | None, **extra) -> dict:
    row = {"bench": "convergence", "method": method, **extra, "eval_loss": round(out["final"], 4)}
    if dp:
        row["vs_data_parallel_pct"] = round(100 * (out["final"] / dp - 1), 2)
    row["wall_s"] = out.get("wall_s")
    return row


def plot(main: dict[str, list], sweep: dict[str, list], path: Path, title: str) -> None:
    """Left: the methods; right: DiLoCo's outer (lr, momentum) sweep, with data parallel for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, curves in zip(axes, (main, sweep), strict=True):
        for label, curve in curves.items():
            xs, ys = zip(*curve, strict=True)
            ax.plot([x / 1e6 for x in xs], ys, marker="o", ms=3, label=label)
        ax.set_xlabel("tokens since the shared warm start (millions, all workers together)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("held-out loss (nats per byte)")
    axes[0].set_title(title, fontsize=9)
    axes[1].set_title("DiLoCo outer lr / momentum sweep (fp32)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(budget: int = 200, warm: int = 400, quarter_seeds: tuple[int, ...] = (1, 2), swarm: bool = True,
        slots: int = 2, hs: tuple[int, ...] = HS, sweep: tuple = tuple(SWEEP)) -> list[dict]:
    """Every row, measured in this run. ``quarter_seeds``: the quarter-token single worker again on other
    data orders, a cheap estimate of seed noise."""
    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench-convergence-"))
    base = {"budget": budget, "warm": warm, "warm_path": str(work / "warm.pt"), "seed": 0}
    print(f"  convergence: work dir {work}", flush=True)
    res: dict[str, dict] = {}

    def best(h: int, r: dict) -> tuple[float, float]:
        return min(sweep, key=lambda o: r[f"diloco-H{h}-{o[0]}-{o[1]}-fp32"]["final"])

    def one(**spec) -> Callable[[dict], list[dict]]:
        return lambda r: [dict(base, **spec)]

    def int8(h: int) -> Callable[[dict], list[dict]]:
        return lambda r: [dict(base, kind="diloco", H=h, outer_lr=best(h, r)[0], momentum=best(h, r)[1],
                               codec="int8")]

    def dp(r: dict) -> list[dict]:
        port = free_port()
        return [dict(base, kind="dp", rank=rank, world=2, port=port) for rank in range(2)]

    jobs: list[Job] = [("warm", one(kind="warm"), ()), ("dp", dp, ("warm",))]
    for h in reversed(hs):
        jobs += [(f"diloco-H{h}-{lr}-{mom}-fp32",
                  one(kind="diloco", H=h, outer_lr=lr, momentum=mom, codec="fp32"), ("warm",))
                 for lr, mom in sweep]
    for h in reversed(hs):
        deps = tuple(f"diloco-H{h}-{lr}-{mom}-fp32" for lr, mom in sweep)
        jobs.append((f"diloco-H{h}-int8", int8(h), deps))
    jobs.append(("single-4x", one(kind="single", steps=K * budget), ("warm",)))
    for seed in (0, *quarter_seeds):
        jobs.append((f"single-quarter-s{seed}", one(kind="single", steps=budget, seed=seed), ("warm",)))
    schedule(jobs, work, slots, res)
    chosen = {h: best(h, res) for h in hs}
    if swarm:
        res["swarm"] = run_swarm(base, work, chosen[hs[-1]], h=hs[-1])
    rows = _table(res, chosen, quarter_seeds, budget, warm, hs, sweep)
    main = {"data parallel, 4x batch": res["dp"]["curve"], "one worker, 4x steps": res["single-4x"]["curve"],
            "one worker, 1/4 tokens": res["single-quarter-s0"]["curve"]}
    sweep_curves = {"data parallel, 4x batch": res["dp"]["curve"]}
    for h in hs:
        for lr, mom in sweep:
            sweep_curves[f"H={h} {lr}/{mom}"] = res[f"diloco-H{h}-{lr}-{mom}-fp32"]["curve"]
        best_fp32 = res[f"diloco-H{h}-{chosen[h][0]}-{chosen[h][1]}-fp32"]["curve"]
        main[f"DiLoCo H={h} {chosen[h][0]}/{chosen[h][1]} fp32"] = best_fp32
        main[f"DiLoCo H={h} {chosen[h][0]}/{chosen[h][1]} int8"] = res[f"diloco-H{h}-int8"]["curve"]
    if swarm:
        main[f"DiLoCo H={hs[-1]} int8, real swarm"] = res["swarm"]["curve"]
    title = f"k={K}, {budget} steps/worker after a {warm}-step warm start (debug model)"
    plot(main, sweep_curves, PLOT, title)
    print(f"  convergence: {time.time() - t_start:.0f} s; logs in {work}", flush=True)
    return rows


def _table(res: dict, best: dict, quarter_seeds: tuple, budget: int, warm: int, hs: tuple,
           sweep: tuple) -> list[dict]:
    dp = res["dp"]["final"]
    tokens = K * budget * 16 * 128
    rows = [_row(f"shared warm start ({warm} steps, one worker)", res["warm"], None, tokens=0)]
    rows.append(_row("one worker, a quarter of the tokens", res["single-quarter-s0"], dp, tokens=tokens // K))
    rows.append(_row("one worker, 4x the steps", res["single-4x"], dp, tokens=tokens))
    rows.append(_row("data parallel, 4x batch (gloo all-reduce every step, 2 ranks x 32 seq)", res["dp"], dp,
                     tokens=tokens, replicas_identical=res["dp"]["replicas_identical"]))
    for h in hs:
        for lr, mom in sweep:
            rows.append(_row("DiLoCo k=4 (sim), outer sweep" + (": best" if (lr, mom) == best[h] else ""),
                             res[f"diloco-H{h}-{lr}-{mom}-fp32"], dp, H=h, outer=f"{lr}/{mom}", codec="fp32",
                             tokens=tokens))
        fp32 = res[f"diloco-H{h}-{best[h][0]}-{best[h][1]}-fp32"]["final"]
        rows.append(_row("DiLoCo k=4 (sim)", res[f"diloco-H{h}-int8"], dp, H=h,
                         outer=f"{best[h][0]}/{best[h][1]}", codec="int8", tokens=tokens,
                         int8_vs_fp32_pct=round(100 * (res[f"diloco-H{h}-int8"]["final"] / fp32 - 1), 2)))
    if "swarm" in res:
        h = hs[-1]
        sim = res[f"diloco-H{h}-int8"]["final"]
        rows.append(_row("DiLoCo k=4 over the real swarm (4 CLI trainers, loopback)", res["swarm"], dp, H=h,
                         outer=f"{best[h][0]}/{best[h][1]}", codec="int8", tokens=tokens,
                         vs_sim_pct=round(100 * (res["swarm"]["final"] / sim - 1), 2),
                         replicas_identical=res["swarm"]["replicas_identical"]))
    quarters = [res[f"single-quarter-s{s}"]["final"] for s in (0, *quarter_seeds)]
    if len(quarters) > 1:
        values = ", ".join(f"{q:.4f}" for q in quarters)
        rows.append({"bench": "convergence",
                     "method": f"seed noise: one worker, 1/4 tokens, {len(quarters)} data orders "
                               f"(std of {values})",
                     "eval_loss": round(statistics.stdev(quarters), 4)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=int, default=200, help="inner steps per worker after the warm start")
    ap.add_argument("--warm", type=int, default=400, help="steps of the shared single-worker warm start")
    ap.add_argument("--quarter-seeds", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--no-swarm", action="store_true")
    a = ap.parse_args(argv)
    if a.job:
        spec = json.loads(Path(a.job).read_text())
        t0 = time.time()
        out = JOBS[spec["kind"]](spec)
        out["wall_s"] = round(time.time() - t0, 1)
        Path(spec["out"]).write_text(json.dumps(out))
        return 0
    for row in run(a.budget, a.warm, tuple(a.quarter_seeds), swarm=not a.no_swarm):
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
