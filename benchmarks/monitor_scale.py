"""Trust-ratio monitoring at the scale of real runs: history, files, plot, and recording cost.

    python benchmarks/monitor_scale.py                       # 2,000 layers x 5,000 records, and ViT-B/16
    python benchmarks/monitor_scale.py --layers 200 --records 500 --no-model   # a smoke run

History: a synthetic run of ``--layers`` parameter tensors recorded ``--records`` times with all four
metrics and their summaries (what ``TrustRatioMonitor`` reports with its defaults), appended to a
``TrustRatioHistory``, written to CSV, read back, and drawn with ``lars-plugins plot``. Each phase
runs in a process of its own, which reports its wall time and its peak resident memory.

Recording cost: a ViT-B/16 (timm, random init, 152 tensors) on the CPU, one step of LARS, LAMB,
AdamW and Layerwise(AdamW) with and without a monitor attached, on steps it records and steps it
does not (medians, interleaved).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# No torch at the top: the read and plot phases must show what reading and plotting cost without it.


def synthetic_records(layers: int, records: int, diverge: bool = False):
    """``(step, record)`` of a run with ``layers`` tensors named like a transformer's, in model order;
    with ``diverge``, one layer's trust ratio turns inf and then NaN over the last records."""
    import numpy as np

    from lars_plugins.history import METRICS

    names = [f"blocks.{i // 8}.{('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2', 'norm1', 'norm2', 'ls1', 'ls2')[i % 8]}"
             f".weight" for i in range(layers)]
    gen = np.random.default_rng(0)
    base = gen.random((len(METRICS), layers)) * 3 - 4  # log10 of the values
    for k in range(records):
        noise = gen.standard_normal((len(METRICS), layers)) * 0.05
        values = np.power(10.0, base + noise - 0.3 * math.log10(k + 1))
        if diverge and k >= records - max(2, records // 50):
            values[0, layers // 3] = math.inf if k < records - 1 else math.nan  # a layer blows up at the end
        values = values.tolist()
        record = {}
        for metric, row in zip(METRICS, values):
            record.update((f"{metric}/{name}", v) for name, v in zip(names, row))
            ordered = sorted(row)
            record[f"{metric}_stats/min"] = ordered[0]
            record[f"{metric}_stats/median"] = ordered[len(ordered) // 2]
            record[f"{metric}_stats/max"] = ordered[-1]
        yield 10 * k, record


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def resident_mb() -> float:
    """Resident memory now (Linux), for what a structure holds once built."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def phase_write(layers: int, records: int, path: str, diverge: bool = False) -> dict:
    from lars_plugins import TrustRatioHistory

    generated = list(synthetic_records(layers, records, diverge))  # made before timing: the run's own work
    base_mb = resident_mb()
    history = TrustRatioHistory()
    start = time.perf_counter()
    for step, record in generated:
        history.append(step, record)
    append_s = time.perf_counter() - start
    held_mb = resident_mb() - base_mb
    del generated
    start = time.perf_counter()
    history.to_csv(path)
    write_s = time.perf_counter() - start
    result = {"append_s": append_s, "append_ms_per_record": 1e3 * append_s / records,
              "history_mb": held_mb, "write_s": write_s, "csv_mb": os.path.getsize(path) / 1e6}
    import importlib.util

    if importlib.util.find_spec("pyarrow") is None:
        return result
    start = time.perf_counter()
    history.to_parquet(path + ".parquet")
    result.update(parquet_write_s=time.perf_counter() - start, parquet_mb=os.path.getsize(path + ".parquet") / 1e6)
    return result


def phase_read(path: str) -> dict:
    from lars_plugins import TrustRatioHistory

    start = time.perf_counter()
    history = TrustRatioHistory.load(path)
    return {"read_s": time.perf_counter() - start, "read_peak_mb": peak_mb(), "steps": len(history)}


def phase_plot(path: str, out: str) -> dict:
    from lars_plugins.cli import main

    start = time.perf_counter()
    main(["plot", path, "--output", out])
    return {"plot_s": time.perf_counter() - start, "plot_peak_mb": peak_mb(), "torch_imported": "torch" in sys.modules}


def phase_help() -> dict:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lars_plugins.cli", "plot", "--help"], check=True, capture_output=True)
    return {"help_s": time.perf_counter() - start}


def in_child(phase: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--phase", phase, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


OPTIMIZERS = {
    "LARS": lambda groups: __import__("lars_plugins").LARS(groups, lr=0.1),
    "LAMB": lambda groups: __import__("lars_plugins").LAMB(groups, lr=1e-3),
    "AdamW": lambda groups: __import__("torch").optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups], lr=1e-3),
    "Layerwise(AdamW)": lambda groups: __import__("lars_plugins").Layerwise(
        __import__("torch").optim.AdamW(groups, lr=1e-3), trust_coefficient=1.0),
}


def recording_cost(reps: int, name: str) -> dict:
    """Median step times of ``name`` on ViT-B/16 without a monitor, and with one on steps it does
    and does not record (interleaved, identical gradients)."""
    import timm
    import torch

    from lars_plugins import TrustRatioMonitor, param_groups

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    plain = OPTIMIZERS[name](param_groups(model, weight_decay=1e-4))
    watched_model = timm.create_model("vit_base_patch16_224", pretrained=False)
    watched_model.load_state_dict(model.state_dict())
    for p, q in zip(watched_model.parameters(), model.parameters()):
        p.grad = q.grad.clone()
    watched = OPTIMIZERS[name](param_groups(watched_model, weight_decay=1e-4))
    monitor = TrustRatioMonitor(watched_model, watched, every_n_steps=2, keep_history=True)
    times: dict[str, list[float]] = {"no monitor": [], "monitor, step not recorded": [], "monitor, step recorded": []}
    for rep in range(2 + 2 * reps):
        for opt in (plain, watched):
            recorded = opt is watched and monitor.will_record()
            start = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - start
            if rep >= 2:
                key = "no monitor" if opt is plain else f"monitor, step {'recorded' if recorded else 'not recorded'}"
                times[key].append(elapsed)
    medians = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {"tensors": len(list(model.parameters())), **medians}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2000)
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=10, help="recording-cost steps of each kind")
    parser.add_argument("--no-model", action="store_true", help="skip the ViT-B/16 recording cost")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS),
                        help="optimizers whose recording cost is measured")
    parser.add_argument("--figure", type=Path, default=None,
                        help="keep the report `lars-plugins plot` drew of a run whose one layer diverges at the end "
                             "(docs/images/monitor_scale_report.png is one)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:  # a child process: one phase, its result as the last line of JSON
        phases = {"write": lambda: phase_write(int(args.args[0]), int(args.args[1]), args.args[2],
                                               diverge=len(args.args) > 3),
                  "read": lambda: phase_read(args.args[0]), "plot": lambda: phase_plot(args.args[0], args.args[1]),
                  "help": phase_help}
        print(json.dumps(phases[args.phase]()))
        return
    print(f"{os.cpu_count()} cores; {args.layers} layers x {args.records} records x 4 metrics (+ summaries); one "
          f"layer's trust ratio goes inf, then NaN, over the last records")
    with tempfile.TemporaryDirectory() as tmp:
        csv_path, png = str(Path(tmp) / "history.csv"), str(args.figure or Path(tmp) / "report.png")
        write = in_child("write", str(args.layers), str(args.records), csv_path, "diverge")
        read = in_child("read", csv_path)
        parquet = in_child("read", csv_path + ".parquet") if "parquet_write_s" in write else None
        plot = in_child("plot", csv_path, png)
        shown = in_child("help")
    print("\n| phase | time | memory |\n|---|---:|---:|")
    per_record = f"{write['append_ms_per_record']:.2f} ms each"
    print(f"| append {args.records} records | {write['append_s']:.1f} s ({per_record}) | "
          f"the history holds {write['history_mb']:.0f} MB |")
    print(f"| to_csv | {write['write_s']:.1f} s | file {write['csv_mb']:.0f} MB |")
    print(f"| from_csv | {read['read_s']:.1f} s | peak {read['read_peak_mb']:.0f} MB |")
    if parquet is not None:
        print(f"| to_parquet | {write['parquet_write_s']:.1f} s | file {write['parquet_mb']:.0f} MB |")
        print(f"| from_parquet | {parquet['read_s']:.1f} s | peak {parquet['read_peak_mb']:.0f} MB |")
    print(f"| lars-plugins plot | {plot['plot_s']:.1f} s | peak {plot['plot_peak_mb']:.0f} MB |")
    print(f"| lars-plugins plot --help | {shown['help_s']:.2f} s | |")
    print(f"\nthe plot imported torch: {plot['torch_imported']} (target: no; <= 15 s and <= 700 MB peak)")
    if args.figure:
        print(f"report written to {args.figure}")
    if not args.no_model:
        print("\nRecording cost, ViT-B/16 (152 tensors), one optimizer step on the CPU, median ms "
              "(x the same optimizer without a monitor):")
        print("\n| optimizer | no monitor | step not recorded | step recorded |\n|---|---:|---:|---:|")
        for name in args.optimizers:
            cost = recording_cost(args.reps, name)
            base = cost["no monitor"]
            print(f"| {name} | {base:.1f} | {cost['monitor, step not recorded']:.1f} "
                  f"({cost['monitor, step not recorded'] / base:.2f}x) | {cost['monitor, step recorded']:.1f} "
                  f"({cost['monitor, step recorded'] / base:.2f}x) |", flush=True)


if __name__ == "__main__":
    main()
