"""The training run the distributed tests compare: the tiny Llama prepared by pyfastpeft (dense, NF4 or int8 base,
LoRA r=8 on all linear layers), a few AdamW steps on a fixed batch, each rank on its share of the batch. Run by
tests/test_distributed.py in processes it spawns (gloo backend, CPU), and in the test's own process as the one-process
reference."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

BATCH, SEQ, STEPS = 4, 32, 4


def batch() -> torch.Tensor:
    return torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def losses(quant, wrapper: str, optimizer: str, rank: int = 0, world_size: int = 1) -> list[float]:
    """Per-step losses averaged over the ranks (each the mean over its sequences, all of one length)."""
    from helpers import tiny_llama

    import pyfastpeft

    model = tiny_llama().train()
    pyfastpeft.prepare_model(
        model,
        quant=quant,
        lora=pyfastpeft.LoraSettings(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
    )
    with torch.no_grad():  # PEFT's B starts at zero; a nonzero start makes every adapter matter from step 1
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
    if wrapper == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif wrapper == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world_size,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw8bit":
        opt = pyfastpeft.optim.AdamW8bit(trainable, lr=1e-2, min_8bit_size=0)
    else:
        opt = torch.optim.AdamW(trainable, lr=1e-2)
    share = BATCH // world_size
    ids = batch()[rank * share : (rank + 1) * share]
    result = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        value = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(value)
            value /= world_size
        result.append(value.item())
    pyfastpeft.unpatch_model(model.module if wrapper == "ddp" else model)
    return result


def worker(rank: int, world_size: int, init_file: str, runs: list, out: str) -> None:
    """Entry point of each spawned process: every (quant, wrapper, optimizer) run; rank 0 writes the losses."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    results = {}
    try:
        for quant, wrapper, optimizer in runs:
            key = f"{quant}/{wrapper}/{optimizer}"
            try:
                results[key] = losses(quant, wrapper, optimizer, rank, world_size)
            except Exception as error:  # noqa: BLE001 - reported to the test, which decides
                results[key] = f"{type(error).__name__}: {error}"
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
