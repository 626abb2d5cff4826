"""One training iteration (forward, backward, optimizer step) of a GPT-style transformer with each
optimizer: LARS against torch's fused SGD, LAMB against torch's fused AdamW, and the wrapper.

The default model has 0.94B parameters (16 blocks of width 2048, 16 heads, vocabulary 32,000,
untied head) and trains on batches of 8 x 1,024 random tokens under bfloat16 autocast with
float32 weights: on a GPU the step is a few percent of the iteration, and what a layer-wise
optimizer adds to it shows up here as it would in pretraining. All optimizers step the same model
in turn (round-robin, so drift in clocks hits all alike); each keeps its own state. Prints the
median iteration time and the median summed kernel time of the step alone, each against its
torch counterpart.

    python benchmarks/transformer_step.py                    # on a GPU
    python benchmarks/transformer_step.py --preset tiny      # a smoke run on the CPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import lars_plugins
from step_time import kernel_ms  # benchmarks/ is the script's folder, on sys.path

PRESETS = {
    "0.94b": dict(width=2048, depth=16, heads=16, vocab=32_000, seq=1024, batch=8),
    "tiny": dict(width=64, depth=2, heads=4, vocab=256, seq=32, batch=4),
}


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        attn = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                          is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, c))
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


class GPT(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, vocab: int, seq: int) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(seq, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def optimizers(model: nn.Module, fused_available: bool) -> dict[str, torch.optim.Optimizer]:
    sgd_groups = lars_plugins.param_groups(model, weight_decay=1e-4)
    adam_groups = lars_plugins.param_groups(model, weight_decay=0.01)
    plain = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in sgd_groups]
    plain_adam = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in adam_groups]
    opts: dict[str, torch.optim.Optimizer] = {
        "SGD(fused)" if fused_available else "SGD(foreach)":
            torch.optim.SGD(plain, lr=1e-3, momentum=0.9, **({"fused": True} if fused_available else {})),
        "LARS": lars_plugins.LARS(sgd_groups, lr=1e-3, momentum=0.9, trust_coefficient=1e-3),
        "AdamW(fused)" if fused_available else "AdamW(foreach)":
            torch.optim.AdamW(plain_adam, lr=1e-5, **({"fused": True} if fused_available else {})),
        "LAMB": lars_plugins.LAMB(adam_groups, lr=1e-5),
        "Layerwise(AdamW(fused))" if fused_available else "Layerwise(AdamW)":
            lars_plugins.Layerwise(torch.optim.AdamW(plain_adam, lr=1e-5, **({"fused": True} if fused_available
                                                                              else {})), trust_coefficient=1.0),
    }
    return opts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="0.94b", choices=list(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = PRESETS[args.preset]
    torch.manual_seed(0)
    model = GPT(cfg["width"], cfg["depth"], cfg["heads"], cfg["vocab"], cfg["seq"]).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    gpu = device.type == "cuda"
    print(f"GPT {args.preset}: {n_params / 1e9:.3f}B parameters in {n_tensors} tensors, batch {cfg['batch']} x "
          f"{cfg['seq']} tokens, device {device}" + (f" ({torch.cuda.get_device_name(device)})" if gpu else ""))
    opts = optimizers(model, fused_available=gpu)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"] + 1), generator=gen).to(device)
               for _ in range(4)]

    def iteration(opt: torch.optim.Optimizer, i: int) -> None:
        tokens = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            logits = model(tokens[:, :-1])
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if gpu else (lambda: None)
    times: dict[str, list[float]] = {label: [] for label in opts}
    for i in range(args.warmup + args.iterations):
        for label, opt in opts.items():
            sync()
            start = time.perf_counter()
            iteration(opt, i)
            sync()
            if i >= args.warmup:
                times[label].append(time.perf_counter() - start)
    medians = {label: statistics.median(t) * 1e3 for label, t in times.items()}
    step_kernels: dict[str, float] = {}
    if gpu:
        for label, opt in opts.items():  # the step alone, on gradients left in place
            tokens = batches[0]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(tokens[:, :-1]).float().flatten(0, 1),
                                                   tokens[:, 1:].flatten())
            loss.backward()
            step_kernels[label] = kernel_ms(opt.step, reps=3)
            opt.zero_grad(set_to_none=True)
    labels = list(opts)
    reference = {"LARS": labels[0], "LAMB": labels[2], labels[4]: labels[2]}
    print(f"{'optimizer':<26}{'iteration ms':>14}{'x torch':>9}" + (f"{'step kernel ms':>16}{'x torch':>9}" if gpu
                                                                   else ""))
    for label in labels:
        ref = reference.get(label, label)
        row = f"{label:<26}{medians[label]:>14.1f}{medians[label] / medians[ref]:>9.3f}"
        if gpu:
            row += f"{step_kernels[label]:>16.2f}{step_kernels[label] / step_kernels[ref]:>9.2f}"
        print(row)
    if gpu:
        for ours, ref in (("LARS", labels[0]), ("LAMB", labels[2])):
            over = medians[ours] / medians[ref] - 1
            print(f"target: {ours} iteration within 5% of {ref}: {over * 100:+.1f}% -> "
                  f"{'met' if over <= 0.05 else 'NOT met'}")
        print(f"peak memory allocated: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
