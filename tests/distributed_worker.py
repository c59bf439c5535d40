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


def prepared(quant, lora: bool = True):
    """The tiny Llama prepared with LoRA r=8 on all linear layers (or none), its adapters drawn nonzero (PEFT's B
    starts at zero; this way every adapter matters from the first step)."""
    from helpers import tiny_llama

    import pyfastpeft

    model = tiny_llama().train()
    settings = pyfastpeft.LoraSettings(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    pyfastpeft.prepare_model(model, quant=quant, lora=settings if lora else False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
    return model


def train(quant, wrapper: str, optimizer: str, rank: int = 0, world_size: int = 1, steps: int = STEPS):
    """(the model, per-step losses averaged over the ranks: each the mean over its sequences, all of one length)."""
    import pyfastpeft

    model = prepared(quant)
    wrapper, *extras = wrapper.split("+")  # "fsdp2+checkpointing", "fsdp2+compile"
    if "checkpointing" in extras:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if wrapper == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif wrapper == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world_size,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if "compile" in extras:
        model.compile()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw8bit":
        opt = pyfastpeft.optim.AdamW8bit(trainable, lr=1e-2, min_8bit_size=0)
    else:
        opt = torch.optim.AdamW(trainable, lr=1e-2)
    share = BATCH // world_size
    ids = batch()[rank * share : (rank + 1) * share]
    result = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        value = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(value)
            value /= world_size
        result.append(value.item())
    return model, result


def losses(quant, wrapper: str, optimizer: str, rank: int = 0, world_size: int = 1) -> list[float]:
    import pyfastpeft

    model, result = train(quant, wrapper, optimizer, rank, world_size)
    pyfastpeft.unpatch_model(model.module if wrapper == "ddp" else model)
    return result


def teardown() -> None:
    """Leave the process group together: a barrier first, so no rank closes its gloo connections while a peer is still
    inside a collective (gloo's reader thread would then see the socket close and abort that peer's process)."""
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def finish() -> None:
    """End a worker whose work is done and written: skip the interpreter's teardown, where a gloo thread left behind
    by DTensor's mesh has twice aborted the process ("terminate called without an active exception") after every
    result was in. A failure before this point still ends the process with an error."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
        teardown()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)


def save_worker(rank: int, world_size: int, init_file: str, directory: str) -> None:
    """NF4 base under FSDP2, trained STEPS steps, then saved two ways: save_adapter (a PEFT directory, written
    whole by rank 0) and torch.distributed.checkpoint of the sharded adapter weights (the frozen base is not saved:
    it is the quantized pretrained model)."""
    import torch.distributed.checkpoint as dcp

    import pyfastpeft

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model, _ = train("nf4", "fsdp2", "adamw", rank, world_size)
        pyfastpeft.save_adapter(model, f"{directory}/adapter")
        # the trainable parameters as they are, DTensor shards (torch's get_model_state_dict walks every state-dict
        # key as an attribute path, and the NF4 layers' bitsandbytes-format keys, weight.absmax and the like, are not)
        adapters = {name: p for name, p in model.named_parameters() if p.requires_grad}
        dcp.save({"model": adapters}, checkpoint_id=f"{directory}/dcp")
        whole = {name: p.detach().full_tensor() for name, p in adapters.items()}  # what both must hold
        if rank == 0:
            torch.save(whole, f"{directory}/expected.pt")
    finally:
        teardown()


def dtensor_worker(rank: int, world_size: int, init_file: str, out: str) -> None:
    """rms_norm, swiglu and apply_rotary_pos_emb on DTensors of a 2-rank mesh, sharded the ways tensor and sequence
    parallelism shard them (and one way that needs a redistribution), against the same calls on whole tensors:
    rank 0 writes the largest difference of each output and gradient."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from pyfastpeft.functional import apply_rotary_pos_emb, rms_norm, swiglu

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    mesh = init_device_mesh("cpu", (world_size,))
    gen = torch.Generator().manual_seed(0)
    results = {}

    def compare(name, fn, inputs: dict, placements: dict, dy):
        """fn on whole leaves and on DTensor leaves; the outputs and every leaf's gradient compared."""
        whole = {k: v.clone().requires_grad_(v.is_floating_point() and k != "table") for k, v in inputs.items()}
        expected = fn(**whole)
        expected = expected if isinstance(expected, tuple) else (expected,)
        torch.autograd.backward(expected, dy)
        shards = {}
        for k, v in inputs.items():
            shards[k] = distribute_tensor(v, mesh, placements[k]) if k in placements else v
            if k in placements and k != "table":
                shards[k].requires_grad_(True)
        got = fn(**shards)
        got = got if isinstance(got, tuple) else (got,)
        grads = [distribute_tensor(g, mesh, o.placements) for g, o in zip(dy, got)]
        torch.autograd.backward(got, grads)
        errors = [(a.full_tensor() - b).abs().max().item() for a, b in zip(got, expected)]
        errors += [
            (shards[k].grad.full_tensor() - whole[k].grad).abs().max().item()
            for k in placements
            if whole[k].requires_grad
        ]
        results[name] = max(errors)

    try:
        x, w = torch.randn(2, 8, 64, generator=gen), torch.randn(64, generator=gen)
        dy = (torch.randn(2, 8, 64, generator=gen),)
        for label, x_placement in (("sequence parallel", Shard(1)), ("hidden sharded", Shard(2))):
            compare(
                f"rms_norm {label}",
                lambda x, w: rms_norm(x, w),
                {"x": x, "w": w},
                {"x": [x_placement], "w": [Replicate()]},
                dy,
            )
        gate, up = torch.randn(2, 8, 96, generator=gen), torch.randn(2, 8, 96, generator=gen)
        compare(
            "swiglu tensor parallel",
            lambda gate, up: swiglu(gate, up),
            {"gate": gate, "up": up},
            {"gate": [Shard(2)], "up": [Shard(2)]},
            (torch.randn(2, 8, 96, generator=gen),),
        )
        q, k = torch.randn(2, 4, 8, 16, generator=gen), torch.randn(2, 2, 8, 16, generator=gen)
        angles = torch.randn(8, 8, generator=gen)
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        compare(
            "rope heads sharded",
            lambda q, k: apply_rotary_pos_emb(q, k, cos, sin),
            {"q": q, "k": k},
            {"q": [Shard(1)], "k": [Shard(1)]},
            (torch.randn(2, 4, 8, 16, generator=gen), torch.randn(2, 2, 8, 16, generator=gen)),
        )
    except Exception as error:  # noqa: BLE001 - reported to the test
        results["error"] = f"{type(error).__name__}: {error}"
    finally:
        teardown()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    finish()
