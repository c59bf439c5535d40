"""Fine-tune a small Llama-shaped model with pyfastpeft's fused QLoRA on a text file, then save the adapter.

    python examples/finetune.py                         # NF4 base + LoRA on examples/data/lighthouse.txt
    python examples/finetune.py --quant none --dtype bf16 --steps 100 --out my_adapter

The model is built from a config with random weights (no download) and reads bytes (vocabulary 256), so the
script runs anywhere; with a real checkpoint, replace build_model with AutoModelForCausalLM.from_pretrained
and the byte tokens with its tokenizer: prepare_model does not care. Prints the loss, perplexity (exp of the
mean next-token NLL, from the same fused pass as the loss), tokens/s and peak memory, and writes the adapter
as a PEFT directory (adapter_config.json + adapter_model.safetensors) that peft.PeftModel.from_pretrained loads.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import pyfastpeft

HERE = Path(__file__).resolve().parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=HERE / "data" / "lighthouse.txt")
    parser.add_argument("--quant", choices=("nf4", "int8", "none"), default="nf4")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("finetune_adapter"))
    args = parser.parse_args()
    if args.steps < 1 or args.batch < 1 or args.seq < 2:
        parser.error("--steps and --batch must be >= 1 and --seq >= 2")
    return args


def build_model(hidden: int, layers: int, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1) * 2,
        num_key_value_heads=max(hidden // 64, 1),
        vocab_size=256,
        max_position_embeddings=4096,
    )
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def batches(tokens: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    """Random windows of seq bytes, forever."""
    if tokens.numel() <= seq:
        raise SystemExit(f"the text has {tokens.numel()} bytes; --seq must be smaller")
    while True:
        starts = torch.randint(0, tokens.numel() - seq, (batch,), generator=generator)
        yield torch.stack([tokens[s : s + seq] for s in starts.tolist()])


def peak_memory(step, device: str) -> int:
    """Peak bytes one training step allocates (torch's CUDA counter, or torch.profiler on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated()
    from pyfastpeft.bench.harness import peak_cpu_bytes

    return peak_cpu_bytes(step)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    tokens = torch.tensor(list(args.text.read_bytes()), dtype=torch.long)
    model = build_model(args.hidden, args.layers, DTYPES[args.dtype], args.device)
    lora = pyfastpeft.LoraSettings(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
    report = pyfastpeft.prepare_model(model, quant=None if args.quant == "none" else args.quant, lora=lora)
    print(report)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    stream = batches(tokens, args.batch, args.seq, torch.Generator().manual_seed(args.seed))

    def step() -> float:
        ids = next(stream).to(args.device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    tokens_per_step = args.batch * args.seq
    start, losses = time.perf_counter(), []
    for index in range(1, args.steps + 1):
        losses.append(step())
        if index == 1 or index % 10 == 0 or index == args.steps:
            elapsed = time.perf_counter() - start
            print(
                f"step {index:4d}  loss {losses[-1]:.4f}  perplexity {math.exp(losses[-1]):8.2f}  "
                f"{tokens_per_step * index / elapsed:9.0f} tokens/s"
            )
    elapsed = time.perf_counter() - start
    peak = peak_memory(step, args.device)
    tail = losses[-min(10, len(losses)) :]
    mean_tail = sum(tail) / len(tail)
    print(
        f"done: {args.steps} steps, loss {losses[0]:.4f} -> {mean_tail:.4f} (mean of the last {len(tail)}), "
        f"perplexity {math.exp(mean_tail):.2f}, {tokens_per_step * args.steps / elapsed:.0f} tokens/s, "
        f"peak memory of a step {peak / 2**20:.1f} MiB"
    )
    pyfastpeft.save_adapter(model, args.out)
    print(f"adapter saved to {args.out}/ (adapter_config.json, adapter_model.safetensors)")


if __name__ == "__main__":
    main()
