"""Every GPU check of the project in one run (GPU time is scarce: one call should answer everything).

    python benchmarks/gpu_check.py [--out DIR]        # about 6-7 minutes on one H200

In order, each part in its own process with its own time limit, so that a failure or a hang in one
part leaves the others' results:

1. the CUDA tests (``tests/test_cuda.py``: every path never synchronises with the host, under
   ``torch.cuda.set_sync_debug_mode("error")``, agrees with the CPU and the float64 references,
   allocates nothing model-sized, and replays a whole training step from a CUDA graph) and the
   fused kernels' tests (``tests/test_fused.py``) run natively;
2. ``benchmarks/step_time.py --device cuda``: every optimizer on ResNet-50 and ViT-B/16, wall and
   kernel time, against torch's fused SGD and AdamW;
3. ``benchmarks/transformer_step.py``: a 0.94B-parameter transformer's training iteration;
4. the fused kernels' block size and warp count against achieved memory bandwidth, on the
   transformer's parameters (what the defaults in ``lars_plugins/fused.py`` were chosen from);
5. ``benchmarks/state_memory.py --device cuda``: ``state_precision``'s state bytes and step time on
   ResNet-50 against float32, and bitsandbytes' and torchao's low-bit optimizers where installed;
6. with ``--with-torchtitan`` (about 1.5 minutes more): torchtitan's own Trainer on one GPU with LAMB
   (``examples/torchtitan_llama.py --tp 1``: its llama3 debug model, FlexAttention, bfloat16
   compute, FSDP2 on a mesh of one), where torchtitan is installed.

Logs go to ``--out`` (default ``$OUT``, else ``gpu_check_output``); the summary table is printed last.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = [
    ("cuda tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py",
                    "tests/test_fused.py"], 170),
    ("step_time", [sys.executable, "benchmarks/step_time.py", "--device", "cuda", "--reps", "20", "--warmup", "5"],
     130),
    ("transformer", [sys.executable, "benchmarks/transformer_step.py"], 100),
    ("kernel sweep", [sys.executable, "benchmarks/gpu_check.py", "--sweep"], 70),
    ("state memory", [sys.executable, "benchmarks/state_memory.py", "--device", "cuda", "--models", "resnet50",
                      "--reps", "10"], 60),
]
TORCHTITAN_PART = [
    ("torchtitan", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                    "examples/torchtitan_llama.py", "--tp", "1", "--steps", "10", "--assets", "/tmp/torchtitan_assets",
                    "--dump-folder", "/tmp/torchtitan_outputs"], 100),
]


def sweep() -> None:
    """Kernel time of the fused LARS and LAMB steps per (BLOCK, warps) on the 0.94B transformer's
    parameters, as achieved bandwidth (bytes each must move over the time), beside torch's fused kernels."""
    import torch

    from lars_plugins import LAMB, LARS, fused
    from transformer_step import GPT, PRESETS, kernel_ms

    cfg = PRESETS["0.94b"]
    torch.manual_seed(0)
    model = GPT(cfg["width"], cfg["depth"], cfg["heads"], cfg["vocab"], cfg["seq"]).cuda()
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n_bytes = sum(p.numel() for p in params) * 4
    print(f"{len(params)} tensors, {n_bytes / 1e9:.2f} GB of float32 parameters")
    torch_steps = {"SGD(fused)": (torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=True), 5),
                   "AdamW(fused)": (torch.optim.AdamW(params, lr=1e-5, fused=True), 7)}
    for label, (opt, streams) in torch_steps.items():
        opt.step()
        ms = kernel_ms(opt.step, reps=5)
        print(f"{label:<14}{'':>16}{ms:>8.2f} ms {streams * n_bytes / ms / 1e9:>7.0f} GB/s ({streams} streams)")
        del opt
    torch.cuda.empty_cache()
    for block in (2048, 4096, 8192):
        for warps in (4, 8):
            fused.BLOCK, fused.NUM_WARPS = block, warps
            for label, make, streams in (("LARS(fused)", lambda: LARS(params, lr=1e-3, momentum=0.9, fused=True), 7),
                                         ("LAMB(fused)", lambda: LAMB(params, lr=1e-5, fused=True), 10)):
                opt = make()
                opt.step()
                ms = kernel_ms(opt.step, reps=5)
                print(f"{label:<14}BLOCK {block:>5} w{warps}{ms:>8.2f} ms {streams * n_bytes / ms / 1e9:>7.0f} GB/s "
                      f"({streams} streams)")
                del opt
                torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_output"))
    parser.add_argument("--sweep", action="store_true", help="run part 4 in this process (used by the run itself)")
    parser.add_argument("--with-torchtitan", action="store_true", help="also run part 5 (torchtitan's Trainer)")
    args = parser.parse_args()
    if args.sweep:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        sweep()
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONUNBUFFERED": "1"}
    info = subprocess.run([sys.executable, "-c", "import torch, triton; print('torch', torch.__version__, '| triton', "
                           "triton.__version__, '|', torch.cuda.get_device_name(0))"], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True)
    summary = [f"machine: {info.stdout.strip() or info.stderr.strip()[-300:]} | nvidia-smi: {smi.stdout.strip()}"]
    print(summary[0], flush=True)
    for name, command, limit in PARTS + (TORCHTITAN_PART if args.with_torchtitan else []):
        log = out / f"{name.replace(' ', '_')}.log"
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=limit)
            text, status = done.stdout + done.stderr, f"rc={done.returncode}"
        except subprocess.TimeoutExpired as expired:
            text = (expired.stdout or b"").decode() + (expired.stderr or b"").decode()
            status = f"TIMED OUT after {limit} s"
        seconds = time.perf_counter() - start
        log.write_text(text)
        print(f"\n===== {name}: {status}, {seconds:.0f} s (log: {log.name}) =====\n{text[-6000:]}", flush=True)
        lines = text.strip().splitlines()
        tail = [line for line in lines if "passed" in line or "failed" in line or "target" in line.lower()
                or "GPU kernel time" in line or "x the fastest" in line or line.startswith('{"losses"')]
        summary.append(f"{name}: {status}, {seconds:.0f} s" + "".join(f"\n    {line}" for line in tail[-12:]))
    print("\n===== summary =====\n" + "\n".join(summary))
    (out / "summary.txt").write_text("\n".join(summary) + "\n")


if __name__ == "__main__":
    main()
