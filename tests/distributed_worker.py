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


def prepared(quant, lora: bool = True, mesh=None):
    """The tiny Llama prepared with LoRA r=8 on all linear layers (or none), its adapters drawn nonzero (PEFT's B
    starts at zero; this way every adapter matters from the first step). With a mesh, each decoder layer is made
    tensor parallel first (torch's parallelize_module, Megatron's plan: q, k, v, gate and up column parallel, o and
    down row parallel), and the adapters shard with their bases."""
    from helpers import tiny_llama

    import pyfastpeft

    model = tiny_llama().train()
    if mesh is not None:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        plan = {f"self_attn.{name}": ColwiseParallel() for name in ("q_proj", "k_proj", "v_proj")}
        plan |= {"mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel()}
        plan |= {"self_attn.o_proj": RowwiseParallel(), "mlp.down_proj": RowwiseParallel()}
        for layer in model.model.layers:
            parallelize_module(layer, mesh, plan)
    settings = pyfastpeft.LoraSettings(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    pyfastpeft.prepare_model(model, quant=quant, lora=settings if lora else False)
    draw_adapters(model)
    return model


def draw_adapters(model) -> None:
    """Every trainable parameter drawn from a generator seeded by its name's length (a DTensor gets its shard)."""
    from pyfastpeft.ops._dtensor import copy_whole

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                copy_whole(p, torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)


def train(quant, wrapper: str, optimizer: str, rank: int = 0, world_size: int = 1, steps: int = STEPS):
    """(the model, per-step losses averaged over the ranks: each the mean over its sequences, all of one length)."""
    import pyfastpeft

    wrapper, *extras = wrapper.split("+")  # "fsdp2+checkpointing", "fsdp2+compile"
    if wrapper == "tp":  # every rank the whole batch, each layer's weights sharded over the ranks
        from torch.distributed.device_mesh import init_device_mesh

        model = prepared(quant, mesh=init_device_mesh("cpu", (world_size,)))
    else:
        model = prepared(quant)
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
    share = BATCH if wrapper == "tp" else BATCH // world_size
    ids = batch()[rank * share : (rank + 1) * share] if share < BATCH else batch()
    return model, run_steps(model, opt, ids, steps, world_size)


def run_steps(model, opt, ids: torch.Tensor, steps: int, world_size: int) -> list[float]:
    """`steps` training steps on ids (labels = ids); each step's loss averaged over the ranks."""
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
    return result


def write_json(rank: int, out: str, payload) -> None:
    """Rank 0 writes what the test reads."""
    if rank == 0:
        with open(out, "w") as f:
            json.dump(payload, f)


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
    write_json(rank, out, results)


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


def tp_save_worker(rank: int, world_size: int, init_file: str, directory: str) -> None:
    """A dense base trained tensor parallel, save_adapter (rank 0 writes the gathered adapters), then load_adapter
    into a fresh tensor-parallel model, whose shards must hold the saved adapters, and which merges and unmerges its
    adapters without changing its logits; rank 0 writes what the test checks."""
    from torch.distributed.device_mesh import init_device_mesh

    import pyfastpeft

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model, _ = train(None, "tp", "adamw", rank, world_size)
        pyfastpeft.save_adapter(model, f"{directory}/adapter")
        trained = {n: p.detach().full_tensor() for n, p in model.named_parameters() if p.requires_grad}
        fresh = prepared(None, lora=False, mesh=init_device_mesh("cpu", (world_size,)))
        pyfastpeft.load_adapter(fresh, f"{directory}/adapter")
        loaded = {n: p.detach().full_tensor() for n, p in fresh.named_parameters() if "lora_" in n}
        layers = [m for m in fresh.modules() if isinstance(m, pyfastpeft.nn.LoRALinear)]
        with torch.no_grad():  # merging into the sharded weights (s B A is a DTensor sharded like W) and back
            before = fresh.eval()(input_ids=batch()).logits
            for layer in layers:
                layer.merge()
            merged = fresh(input_ids=batch()).logits
            for layer in layers:
                layer.unmerge()
            unmerged = fresh(input_ids=batch()).logits
        merge_error = max((merged - before).abs().max().item(), (unmerged - before).abs().max().item())
        try:
            layers[0].add_adapter("dora", use_dora=True)
            dora = "no error"
        except ValueError as error:
            dora = str(error)
        if rank == 0:
            result = {"trained": trained, "loaded": loaded, "merge_error": merge_error, "dora": dora}
            torch.save(result, f"{directory}/tp.pt")
    finally:
        teardown()
    finish()


def hf_tp_worker(rank: int, world_size: int, init_file: str, directory: str, out: str) -> None:
    """The saved tiny Llama loaded by transformers with its own tensor-parallel plan (tp_plan="auto": q, k, v, gate
    and up column parallel, o and down row parallel, DTensor weights), prepared over the dense base, its adapters
    drawn as prepared() draws them, trained STEPS steps on the whole batch: rank 0 writes the losses."""
    import os

    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    import pyfastpeft

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        model = AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto", device_mesh=mesh)
        placements = {name: str(p.placements) for name, p in model.named_parameters() if hasattr(p, "placements")}
        settings = pyfastpeft.LoraSettings(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
        pyfastpeft.prepare_model(model, quant=None, lora=settings)
        draw_adapters(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        result = run_steps(model.train(), optimizer, batch(), STEPS, world_size)
    finally:
        teardown()
    write_json(rank, out, {"losses": result, "placements": placements})
    finish()


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
    results, refused = {}, {}

    def compare(name, fn, inputs: dict, placements: dict, dy, expected_fn=None, frozen=("table",)):
        """fn on whole leaves (or expected_fn, the same math written out) and on DTensor leaves; the outputs and every
        leaf's gradient compared (not those of the frozen leaves)."""
        whole = {k: v.clone().requires_grad_(v.is_floating_point() and k not in frozen) for k, v in inputs.items()}
        expected = (expected_fn or fn)(**whole)
        expected = expected if isinstance(expected, tuple) else (expected,)
        torch.autograd.backward(expected, dy)
        shards = {}
        for k, v in inputs.items():
            shards[k] = distribute_tensor(v, mesh, placements[k]) if k in placements else v
            if k in placements and k not in frozen:
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
        lora_cases(compare, refused, world_size)
    except Exception as error:  # noqa: BLE001 - reported to the test
        results["error"] = f"{type(error).__name__}: {error}"
    finally:
        teardown()
    write_json(rank, out, {"errors": results, "refused": refused})
    finish()


def lora_cases(compare, refused: dict, world_size: int) -> None:
    """lora_linear tensor parallel the two ways (column: W, B and bias Shard(0); row: x, W and A sharded on in),
    sequence parallel over a whole NF4 base, and with dropout: column parallel on ranks seeded alike draws the one
    process's mask; row parallel draws each rank's mask for its shard (same seed, the shard's shape), which
    expected_fn rebuilds to check that the mask is applied consistently forward and backward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    from pyfastpeft.functional import lora_linear
    from pyfastpeft.quant import quantize_nf4
    from pyfastpeft.reference.lora import keep_mask

    gen = torch.Generator().manual_seed(1)
    out_f, in_f, r, s, p = 48, 32, 4, 2.0, 0.25
    x = torch.randn(2, 8, in_f, generator=gen)
    w, bias = torch.randn(out_f, in_f, generator=gen) / 8, torch.randn(out_f, generator=gen)
    a, b = torch.randn(r, in_f, generator=gen) / 4, torch.randn(out_f, r, generator=gen) / 4
    dy = (torch.randn(2, 8, out_f, generator=gen),)
    inputs = {"x": x, "w": w, "bias": bias, "a": a, "b": b}
    column = {"x": [Replicate()], "w": [Shard(0)], "bias": [Shard(0)], "a": [Replicate()], "b": [Shard(0)]}
    row = {"x": [Shard(2)], "w": [Shard(1)], "bias": [Replicate()], "a": [Shard(1)], "b": [Replicate()]}

    def seeded(dropout_p):
        def fn(x, w, bias, a, b):
            torch.manual_seed(7)  # every rank, and the whole call: the same (seed, offset) drawn
            return lora_linear(x, w, bias, a, b, s, dropout_p, training=True)

        return fn

    for label, placements in (("column", column), ("row", row)):
        compare(f"lora_linear {label} parallel", seeded(0.0), inputs, placements, dy, frozen=("w",))
    compare("lora_linear column parallel, dropout", seeded(p), inputs, column, dy, frozen=("w",))

    def row_masks(x, w, bias, a, b):
        """The row-parallel dropout written out: each rank's mask from the same draw over its [.., in / n] shard."""
        torch.manual_seed(7)
        rng = torch.randint(0, 2**62, (2,), dtype=torch.int64)
        shard = (*x.shape[:-1], x.shape[-1] // world_size)
        keep = torch.cat([keep_mask(rng, shard, p, x.device)] * world_size, dim=-1)
        return x @ w.T + bias + s * ((x * keep / (1 - p)) @ a.T) @ b.T

    compare("lora_linear row parallel, dropout", seeded(p), inputs, row, dy, expected_fn=row_masks, frozen=("w",))

    packed, state = quantize_nf4(w)

    def nf4(x, bias, a, b):
        return lora_linear(x, (packed, state), bias, a, b, s)

    sequence = {"x": [Shard(1)], "bias": [Replicate()], "a": [Replicate()], "b": [Replicate()]}
    compare("lora_linear nf4 sequence parallel", nf4, {k: inputs[k] for k in sequence}, sequence, dy)

    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    x_rows, w_column = distribute_tensor(x, mesh, [Shard(1)]), distribute_tensor(w, mesh, [Shard(0)])
    refusals = {  # each must raise ValueError naming what to change
        "lora_A": lambda: lora_linear(x_rows, w, None, a.clone().requires_grad_(), b, s),
        "x is not": lambda: lora_linear(x, w_column, None, a, b, s),
        "quantized base": lambda: lora_linear(
            x_rows, (distribute_tensor(packed, mesh, [Shard(0)]), state), None, a, b, s
        ),
    }
    for expected, call in refusals.items():
        try:
            call()
            refused[expected] = "no error"
        except ValueError as error:
            refused[expected] = str(error)
