"""Hot path in instructions: what a span processor makes the app's thread execute, per span.

`bench_hotpath.py` times the same work, and on a shared VM its repetitions spread widely (a
ratio of 0.23 in one and 0.67 in the next, the same code). This counts instead: each provider
runs `bench_hotpath.py`'s workload in its own process under valgrind's callgrind, which counts
the instructions the app's thread executes and simulates its first-level caches. The counts
repeat to within a fraction of a percent run after run, so a change of a few percent in the
hooks shows. The same four providers as `bench_hotpath.py` (bare, BSP with a no-op exporter,
hooks that do nothing, ours with a local server to post to), both span shapes.

Only the measured traces are counted (callgrind collects while the workload runs inside one
`math.fsum` call, after a warm-up), on the app's thread alone. Beside the instructions: cache
misses in callgrind's model of the first-level caches, and its rough cycle estimate
(instructions + 10 per first-level miss + 100 per last-level miss).

Beware what counts are not. They are not time: the SDK's `BatchSpanProcessor` spends most of
its time in garbage collection over the spans it holds, memory that misses the caches of a real
machine far more than valgrind's model shows (its last level is the host's whole last-level
cache), so timed, BSP costs more than its instructions say, and ours / BSP is lower timed. And
valgrind runs the process tens of times slower while our lineage worker's timers keep wall
time: its passes come that many times more often per span than natively, and each leaves the
app's thread refilling the interpreter's type cache (about 800 instructions per span here, none
with the worker stopped), so ours is somewhat overstated.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import clean_env_copy, clean_environment, emit, local_server, machine, parser
from bench_hotpath import SHAPES, Workload, _provider, shape

KINDS = ("bare", "bsp", "floor", "ours")
BLOCK = 200  # traces per call of the workload, as in bench_hotpath
# callgrind's event names, as its output files list them, and the cycle estimate's weights.
_EVENTS = ("Ir", "Dr", "Dw", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw")
_WEIGHTS = {"I1mr": 10, "D1mr": 10, "D1mw": 10, "ILmr": 100, "DLmr": 100, "DLmw": 100}


def worker(kind: str, base_url: str, user_on_handler: bool, warmup: int, traces: int) -> int:
    """One provider: a warm-up, then `traces` traces inside `math.fsum`, which callgrind's
    ``--toggle-collect`` turns collection on for."""
    clean_environment()
    provider, _ = _provider(kind, base_url)
    tracer = provider.get_tracer("bench")
    work = Workload(user_on_handler)
    for _ in range(warmup // BLOCK):
        work.run(tracer, BLOCK)

    def blocks() -> Any:
        for _ in range(traces // BLOCK):
            yield work.run(tracer, BLOCK)

    math.fsum(blocks())
    provider.shutdown()
    return 0


def _count(kind: str, shape_name: str, base_url: str, warmup: int, traces: int,
           tmp: Path) -> dict[str, float]:
    """Run one provider under callgrind; its app thread's events per span."""
    out = tmp / f"{kind}.{shape_name}"
    cmd = ["valgrind", "--tool=callgrind", "--separate-threads=yes", "--cache-sim=yes",
           "--collect-atstart=no", "--toggle-collect=math_fsum",
           f"--callgrind-out-file={out}.%p",
           sys.executable, __file__, "--worker", kind, "--shape", shape_name,
           "--base-url", base_url, "--warmup", str(warmup), "--traces", str(traces)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**clean_env_copy(), "PYTHONHASHSEED": "0"})
    main_thread = sorted(tmp.glob(f"{out.name}.*-01"))  # callgrind numbers threads from 01
    if proc.returncode != 0 or not main_thread:
        raise RuntimeError(f"callgrind run of {kind} failed: {proc.stderr[-2000:]}")
    events = _summary(main_thread[0])
    spans = 2 * (traces // BLOCK) * BLOCK
    return {name: events[name] / spans for name in _EVENTS}


def _summary(path: Path) -> dict[str, int]:
    names: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith("events:"):
            names = line.split()[1:]
        elif line.startswith("summary:"):
            values = [int(v) for v in line.split()[1:]]  # trailing zeros are left out
            return dict(zip(names, values + [0] * (len(names) - len(values)), strict=True))
    raise RuntimeError(f"no summary line in {path}")


def _estimate(ev: dict[str, float]) -> float:
    return ev["Ir"] + sum(w * ev[name] for name, w in _WEIGHTS.items())


def measure(warmup: int, traces: int, shapes: list[str]) -> dict[str, Any]:
    with local_server() as server, tempfile.TemporaryDirectory() as tmp, \
            ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        jobs = {(s, k): pool.submit(_count, k, s, server.base_url, warmup, traces, Path(tmp))
                for s in shapes for k in KINDS}
        counts = {key: job.result() for key, job in jobs.items()}
    out: dict[str, Any] = {"warmup_traces": warmup, "traces": traces, "shapes": {}}
    for s in shapes:
        bare = counts[(s, "bare")]
        res: dict[str, Any] = {"shape": shape(SHAPES[s]), "bare": bare}
        for k in KINDS[1:]:
            ev = counts[(s, k)]
            res[k] = {name: ev[name] - bare[name] for name in _EVENTS}
            res[k]["est_cycles"] = _estimate(ev) - _estimate(bare)
        res["ratio_instructions"] = res["ours"]["Ir"] / res["bsp"]["Ir"]
        res["ratio_est_cycles"] = res["ours"]["est_cycles"] / res["bsp"]["est_cycles"]
        out["shapes"][s] = res
    return out


def report(res: dict[str, Any]) -> str:
    lines = [f"hot path in instructions, {res['shape']['title']}: the app thread's instructions "
             f"per span under callgrind, over a bare provider",
             f"  bare provider, per span (reference)     {res['bare']['Ir']:9,.0f} instructions, "
             f"first-level misses: code {res['bare']['I1mr']:,.0f}, data "
             f"{res['bare']['D1mr'] + res['bare']['D1mw']:,.0f}"]
    labels = {"bsp": "+ BatchSpanProcessor(no-op exporter)", "floor":
              "+ a processor whose hooks do nothing", "ours": "+ MetadataSpanProcessor (defaults)"}
    for k, label in labels.items():
        ev = res[k]
        lines.append(f"  {label:39s} {ev['Ir']:+9,.0f}   misses: code {ev['I1mr']:+,.0f}, data "
                     f"{ev['D1mr'] + ev['D1mw']:+,.0f}; estimated cycles {ev['est_cycles']:+,.0f}")
    lines.append(f"  ratio ours / BSP: instructions {res['ratio_instructions']:.2f}, estimated "
                 f"cycles {res['ratio_est_cycles']:.2f} (counts, not time: see the docstring; "
                 f"the time target is bench_hotpath.py's)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--warmup", type=int, default=2000, help="traces before counting")
    p.add_argument("--traces", type=int, default=2000, help="traces counted, per provider")
    p.add_argument("--shape", choices=("both", *SHAPES), default="both")
    p.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--base-url", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.base_url, SHAPES[args.shape], args.warmup, args.traces)
    if shutil.which("valgrind") is None:
        print("hot path in instructions: skipped, valgrind is not installed")
        return 0
    shapes = list(SHAPES) if args.shape == "both" else [args.shape]
    results = measure(args.warmup, args.traces, shapes)
    results["machine"] = machine()
    for res in results["shapes"].values():
        print(report(res), flush=True)
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
