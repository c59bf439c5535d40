"""Distributed training of prepare_model'd models on CPU (gloo, 2 processes spawned by the test): DDP and FSDP2
(fully_shard per decoder layer and at the root) over dense, NF4 and int8 bases, with torch's AdamW and our AdamW8bit,
give the per-step losses of one process on the whole batch. Under FSDP2 the NF4 and int8 weights are sharded with
the rest (uint8 / int8 DTensors); AdamW8bit updates each rank's shard with states of the shard's size, so its
blocks of 256 follow the shard and its losses agree to the quantization's noise instead of to fp32 rounding."""

import json

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_worker import losses, worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

RUNS = [
    (None, "ddp", "adamw"),
    ("nf4", "ddp", "adamw"),
    ("int8", "ddp", "adamw"),
    ("nf4", "ddp", "adamw8bit"),
    (None, "fsdp2", "adamw"),
    ("nf4", "fsdp2", "adamw"),
    ("int8", "fsdp2", "adamw"),
    ("nf4", "fsdp2", "adamw8bit"),
]


@pytest.fixture(scope="module")
def two_process_losses(tmp_path_factory):
    directory = tmp_path_factory.mktemp("distributed")
    out = directory / "losses.json"
    mp.start_processes(
        worker,
        args=(2, str(directory / "init"), RUNS, str(out)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    return json.loads(out.read_text())


@pytest.mark.parametrize("quant, wrapper, optimizer", RUNS)
def test_two_processes_give_one_process_losses(two_process_losses, quant, wrapper, optimizer):
    got = two_process_losses[f"{quant}/{wrapper}/{optimizer}"]
    assert not isinstance(got, str), got
    expected = losses(quant, "none", optimizer)
    rel = 2e-5 if (wrapper, optimizer) == ("fsdp2", "adamw8bit") else 1e-6
    assert got == pytest.approx(expected, rel=rel), (got, expected)
    assert got[-1] < got[0] - 0.1  # it trains
