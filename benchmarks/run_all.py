"""Run every benchmark (`make bench`), each in its own process, then print a compact summary.

Every figure is printed beside a baseline measured in the same run, as a median of several
repetitions. Pass ``--quick`` for fewer repetitions (a smoke run, not for quoting).
Benchmarks talk to 127.0.0.1 only. Takes about eleven minutes on a 2-core machine, four of
them counting instructions under valgrind.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import HERE, clean_env_copy, machine, verdict

# script, arguments for a full run, arguments for --quick
BENCHMARKS: list[tuple[str, list[str], list[str]]] = [
    ("bench_hotpath.py", [], ["--reps", "3", "--rounds", "6"]),
    ("bench_instructions.py", [], ["--warmup", "400", "--traces", "400"]),
    ("bench_delivery.py", [], ["--reps", "2", "--baseline-reps", "1"]),
    ("bench_coalescing.py", [], ["--reps", "1"]),
    ("bench_memory.py", [], ["--reps", "1"]),
    # The load part runs 10 s here (the target is 60: bench_scale.py --duration 60).
    ("bench_scale.py", [], ["--reps", "1", "--duration", "5"]),
    ("bench_spool.py", [], ["--reps", "1"]),
    ("bench_http.py", [], ["--n", "300", "--reps", "1"]),
]


def _run(script: str, args: list[str], out: Path) -> tuple[int, float]:
    print(f"\n$ python benchmarks/{script} {' '.join(args)}".rstrip(), flush=True)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(HERE / script), *args, "--json", str(out)],
                          env=clean_env_copy(), check=False)
    return proc.returncode, time.monotonic() - t0


def summary(results: dict[str, Any]) -> list[str]:
    lines = []
    hot = results.get("bench_hotpath.py")
    if hot:
        for res in hot["shapes"].values():
            lines.append(
                f"hot path ({res['shape']['title'].split(',')[0]}: "
                f"{res['shape']['title'].split(', ', 1)[1]}): ours +{res['ours_added_us']:.2f} µs"
                f"/span vs BSP +{res['bsp_added_us']:.2f} -> ratio {res['ratio']:.2f} "
                f"(<= 0.35) {verdict(res['ratio'] <= 0.35)}; hooks that do nothing: "
                f"{res['floor_ratio']:.2f}")
    ins = results.get("bench_instructions.py")
    if ins:
        for res in ins["shapes"].values():
            lines.append(
                f"hot path in instructions ({res['shape']['title'].split(',')[0]}, callgrind): "
                f"ours {res['ours']['Ir']:+,.0f} per span vs BSP {res['bsp']['Ir']:+,.0f} -> "
                f"{res['ratio_instructions']:.2f}; estimated cycles "
                f"{res['ratio_est_cycles']:.2f} (counts, not time)")
    dlv = results.get("bench_delivery.py")
    if dlv:
        lines.append(
            f"delivery ({dlv['n']} IDs, {dlv['rtt_s'] * 1000:.0f} ms RTT): ours "
            f"{dlv['ours_s']:.2f} s vs one blocking POST each {dlv['blocking_s']:.2f} s -> "
            f"{dlv['speedup']:.1f}x (>= 6x) {verdict(dlv['speedup'] >= 6)}; "
            f"{dlv['ours_over_limit']:.2f}x the limit N*RTT/{dlv['max_concurrency']} = "
            f"{dlv['limit_s']:.2f} s")
    coal = results.get("bench_coalescing.py")
    if coal:
        for name, s in coal["schedules"].items():
            lines.append(
                f"coalescing ({coal['updates']} updates, {coal['ids']} IDs, {name}): "
                f"{s['posts']:.0f} POSTs vs {coal['updates']} -> {s['per_id_per_flush']:.2f} "
                f"per ID per flush (<= 1) "
                f"{verdict(s['per_id_per_flush'] <= 1 and s['correct'])}")
    mem = results.get("bench_memory.py")
    if mem:
        for name, c in mem["cases"].items():
            if name == "plain traffic":
                lines.append(f"memory ({name}, {c['traces']} traces carrying nothing for us): "
                             f"{c['ours_delta_mib'] - c['bare_delta_mib']:.1f} MiB in all over a "
                             f"bare provider (remembered parent links)")
            else:
                lines.append(f"memory ({name}, {c['traces']} traces): "
                             f"{c['bytes_per_trace']:.0f} bytes per trace over a bare provider")
    scale = results.get("bench_scale.py")
    if scale:
        cpu = scale.get("cpu")
        if cpu:
            lines.append(
                f"CPU per delivered record, every thread ({cpu['ids']} IDs, 1 span in 20 a "
                f"request): ours +{cpu['ours_us']:.0f} µs (<= 250) "
                f"{verdict(cpu['ours_us'] <= 250)}; vendor's blocking requests.post "
                f"+{cpu['vendor_us']:.0f} µs; BSP + OTLP/HTTP +{cpu['otlp_us']:.0f} µs")
        for c, v in scale.get("ratio", {}).get("levels", {}).items():
            lines.append(
                f"400 IDs at 50 ms, max_concurrency {c}: {v['ratio']:.2f}x N*RTT/{c} (<= 1.15) "
                f"{verdict(v['ratio'] <= 1.15)}; floor {v['floor']:.2f}x, a client of next to "
                f"no CPU on the same server {v['raw_ratio']:.2f}x")
        load = scale.get("load")
        if load:
            ok = (load["delivered_with_lineage"] == load["ids"] and load["flushed"]
                  and load["rss_flat"] and load["app_ratio"] <= 1.10)
            lines.append(
                f"load {load['rate']:.0f} IDs/s for {load['seconds']:.0f} s at 50 ms: "
                f"{load['delivered_with_lineage']}/{load['ids']} delivered with lineage, flush "
                f"{load['flushed']}, RSS flat {load['rss_flat']}, app per span "
                f"{load['app_ratio']:.2f}x idle (<= 1.10) {verdict(ok)}")
    spool = results.get("bench_spool.py")
    if spool:
        sp, mem = spool["spool"], spool["memory"]
        lines.append(
            f"spool: worker CPU per put {sp['put_us']:.0f} µs vs {mem['put_us']:.1f} µs in "
            f"memory; senders' take+ack {sp['take_ack_us']:.0f} µs vs {mem['take_ack_us']:.1f} "
            f"µs; {sp['records_per_s']:.0f} records/s vs {mem['records_per_s']:.0f}; "
            f"{sp['bytes_per_record']:.0f} bytes on disk per waiting record")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions: a smoke run")
    p.add_argument("--only", nargs="*", help="script names to run (default: all)")
    args = p.parse_args(argv)
    m = machine()
    print(f"machine: {m['nproc']} CPUs, {m['cpu']}, {m['implementation']} {m['python']}, "
          f"{m['platform']}")
    results: dict[str, Any] = {}
    failed = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for script, full, quick in BENCHMARKS:
            if args.only and script not in args.only:
                continue
            out = Path(tmp) / (script + ".json")
            code, seconds = _run(script, quick if args.quick else full, out)
            print(f"({seconds:.0f} s)")
            if code != 0:
                failed.append(script)
            if out.exists():
                results[script] = json.loads(out.read_text())
    print(f"\nsummary ({time.monotonic() - started:.0f} s in all"
          f"{', --quick: not for quoting' if args.quick else ''}):")
    for line in summary(results):
        print("  " + line)
    if failed:
        print(f"  failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
