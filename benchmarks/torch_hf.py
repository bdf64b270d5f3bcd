"""Peer: PyTorch + Hugging Face transformers, eager, dynamic padding, fp32, bf16 autocast or int8.

The recipe is the one the transformers docs teach for sequence classification
on CPU, with our pipeline's hyperparameters so the work per step is the same:
`AutoModelForSequenceClassification` on the same MiniLM-L6 weights (the
package's Hugging Face-format folder), the fast tokenizer run once over the
sentences (as our pipeline tokenizes once and caches), batches of 32 in a
seeded random order padded to their longest sentence (`DataCollatorWithPadding`,
collated inside the timed loop as a `DataLoader` would), `torch.optim.AdamW`
(lr 1e-4, weight decay 0.01 except biases and LayerNorm, eps 1e-6), linear
warm-up and decay, gradient clipping at norm 1.0. `dtype=bf16` wraps the
forward pass in `torch.autocast("cpu", dtype=torch.bfloat16)` (backward runs
outside it, as the AMP docs prescribe); parameters and optimizer stay float32.
`dtype=int8` (inference only) is `torch.ao.quantization.quantize_dynamic` on
every `nn.Linear`, PyTorch's post-training int8 for transformers on CPU.

Inference feeds raw strings: tokenization (padding each batch to its longest
sentence) is inside the timed call, like our SavedModel's string signature.

Run through `benchmarks.run_all`; by hand:
`python -m benchmarks.torch_hf --mode=train --args_json='{"dtype": "bf16"}'`.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np

from benchmarks import _harness

DEFAULTS = {
    "dtype": "fp32",
    "train_examples": 1024,
    "warmup_steps": 5,
    "batch_size": 32,
    "sequence_length": 128,
    "learning_rate": 1e-4,
    "seed": 0,
    "latency_calls": 200,
    "infer_examples": 1024,
    "infer_batch_size": 64,
    "threads": 0,
}


def _setup(args: dict):
    import torch

    if args["threads"]:
        torch.set_num_threads(int(args["threads"]))
    torch.manual_seed(args["seed"])
    return torch


def _autocast(torch, dtype: str):
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if dtype in ("fp32", "int8"):
        return contextlib.nullcontext()
    raise ValueError(f"Unknown dtype. Received: dtype={dtype}. Expected fp32, bf16 or int8.")


def train(args: dict) -> dict:
    """Training examples/s over one pass of the sample, after `warmup_steps` steps."""
    args = {**DEFAULTS, **args}
    torch = _setup(args)
    import transformers

    model_dir = str(_harness.hf_model_dir())
    texts, labels = _harness.sample_sst2(args["train_examples"], args["seed"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    encoded = tokenizer(texts, truncation=True, max_length=args["sequence_length"])
    features = [
        {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": int(y)}
        for ids, mask, types, y in zip(
            encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"], labels,
            strict=True,
        )
    ]
    collator = transformers.DataCollatorWithPadding(tokenizer)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model.train()

    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
         "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)],
         "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args["learning_rate"], eps=1e-6)
    batch_size = args["batch_size"]
    steps_per_pass = -(-len(features) // batch_size)
    total_steps = args["warmup_steps"] + steps_per_pass
    scheduler = transformers.get_linear_schedule_with_warmup(
        optimizer, int(0.1 * total_steps), total_steps
    )

    def batches(seed: int):
        order = np.random.default_rng(seed).permutation(len(features))
        for start in range(0, len(order), batch_size):
            yield collator([features[i] for i in order[start : start + batch_size]])

    padded_tokens, real_tokens, losses = 0, 0, []

    def step(batch) -> None:
        with _autocast(torch, args["dtype"]):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))  # Waits for the step, like Keras' per-step logs.

    warm = _harness.Clock()
    warm.start()
    for i, batch in enumerate(batches(args["seed"] + 1)):
        if i == args["warmup_steps"]:
            break
        step(batch)
    warm.stop()

    clock = _harness.Clock()
    clock.start()
    steps = 0
    for batch in batches(args["seed"] + 2):
        padded_tokens += int(batch["input_ids"].numel())
        real_tokens += int(batch["attention_mask"].sum())
        step(batch)
        steps += 1
    clock.stop()

    lengths = [len(f["input_ids"]) for f in features]
    return {
        "examples": len(features),
        "steps": steps,
        "examples_per_s": len(features) / clock.wall_s,
        "cpu_ms_per_example": 1000.0 * clock.cpu_s / len(features),
        "timed_s": clock.wall_s,
        "warmup_s": warm.wall_s,
        "real_tokens": real_tokens,
        "padded_tokens": padded_tokens,
        "lengths": lengths,
        "final_loss": losses[-1],
        "params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def infer(args: dict) -> dict:
    """Batch-1 latency (p50/p95) and batch-64 examples/s, raw strings in, probabilities out."""
    args = {**DEFAULTS, **args}
    torch = _setup(args)
    import transformers

    model_dir = str(_harness.hf_model_dir())
    texts, _ = _harness.sample_sst2(args["infer_examples"], args["seed"] + 7, split="train")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model.eval()
    if args["dtype"] == "int8":
        # PyTorch's counterpart of our int8 forms: dynamic quantization of every
        # Linear (int8 weights, activations quantized on the fly at each call).
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

    def predict(batch: list[str]) -> np.ndarray:
        with torch.inference_mode(), _autocast(torch, args["dtype"]):
            encoded = tokenizer(batch, padding=True, truncation=True,
                                max_length=args["sequence_length"], return_tensors="pt")
            logits = model(**encoded).logits
        return torch.softmax(logits.float(), dim=-1).numpy()

    return _harness.inference_protocol(predict, texts, args) | {
        "threads": torch.get_num_threads(),
        "quantized_engine": torch.backends.quantized.engine if args["dtype"] == "int8" else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


if __name__ == "__main__":
    sys.exit(_harness.child_main({"train": train, "infer": infer}))
