"""pyfastpeft.optim's 8-bit optimizers against bitsandbytes' (trajectories, state_dicts loaded both ways, Trainer) and
against fp32 AdamW (a training run on the tiny model stays within a band of it)."""

import copy

import pytest
import torch
from helpers import tiny_llama

import pyfastpeft
from pyfastpeft.optim import Adam8bit, AdamW8bit, Lion8bit, PagedAdam8bit, PagedAdamW8bit, PagedLion8bit


def _bitsandbytes():
    try:
        import bitsandbytes

        p = torch.nn.Parameter(torch.zeros(4096))
        p.grad = torch.ones(4096)
        bitsandbytes.optim.AdamW8bit([p]).step()  # its CPU 8-bit kernels work here
    except Exception:
        return None
    return bitsandbytes


bnb = _bitsandbytes()
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes' 8-bit optimizers do not run here")
PAIRS = {
    "AdamW8bit": (AdamW8bit, lambda: bnb.optim.AdamW8bit, dict(lr=1e-3, weight_decay=0.01)),
    "Adam8bit": (Adam8bit, lambda: bnb.optim.Adam8bit, dict(lr=1e-3)),
    "Lion8bit": (Lion8bit, lambda: bnb.optim.Lion8bit, dict(lr=1e-4, weight_decay=0.1)),
}


def trajectory(optimizer_class, kwargs, steps, shapes=((300, 200), (64,)), seed=0, state_dict=None, start=None):
    """Parameters after `steps` steps on fixed random gradients (the same for every optimizer)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02) for shape in shapes]
    if start is not None:
        with torch.no_grad():
            for p, value in zip(params, start):
                p.copy_(value)
    optimizer = optimizer_class(params, **kwargs)
    if state_dict is not None:
        optimizer.load_state_dict(state_dict)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 0.01
        optimizer.step()
    return params, optimizer


def relative_gap(ours, theirs, start):
    """mean |ours - theirs| over mean |theirs - start|: how far apart the runs are, per unit of distance moved."""
    moved = sum((t - s).abs().sum() for t, s in zip(theirs, start))
    gap = sum((o - t).abs().sum() for o, t in zip(ours, theirs))
    return (gap / moved).item()


@needs_bnb
@pytest.mark.parametrize("name", PAIRS)
def test_trajectory_follows_bitsandbytes(name):
    ours_class, theirs_class, kwargs = PAIRS[name]
    start, _ = trajectory(torch.optim.SGD, dict(lr=0.0), 0)
    ours, _ = trajectory(ours_class, kwargs, 20)
    theirs, _ = trajectory(theirs_class(), kwargs, 20)
    # bnb's CPU kernel rounds states through a 65536-entry grid, ours to the nearest code: a few codes differ
    assert relative_gap(ours, theirs, start) < 0.02


@needs_bnb
@pytest.mark.parametrize("name", PAIRS)
def test_state_dicts_load_both_ways(name):
    ours_class, theirs_class, kwargs = PAIRS[name]
    theirs_class = theirs_class()
    for saver, loader in ((theirs_class, ours_class), (ours_class, theirs_class)):
        params, saved = trajectory(saver, kwargs, 5)
        state_dict = saved.state_dict()
        start = [p.detach().clone() for p in params]
        continued, loaded = trajectory(loader, kwargs, 3, seed=1, state_dict=state_dict, start=start)
        expected, _ = trajectory(saver, kwargs, 3, seed=1, state_dict=state_dict, start=start)
        big = loaded.state[continued[0]]
        assert big["state1"].dtype == torch.uint8 and big["step"] == 8
        assert loaded.state[continued[1]]["state1"].dtype == torch.float32  # under min_8bit_size: fp32 state
        assert relative_gap(continued, expected, start) < 0.05


def test_state_memory_is_a_quarter_of_fp32_adam():
    p = torch.nn.Parameter(torch.randn(1024, 1024))
    p.grad = torch.randn_like(p)
    ours = AdamW8bit([p])
    ours.step()
    reference = torch.optim.AdamW([p])
    reference.step()
    nbytes = lambda state: sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))  # noqa: E731
    assert nbytes(ours.state[p]) / nbytes(reference.state[p]) < 0.26


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_stays_within_a_band_of_fp32_adamw(dtype):
    """The tiny Llama trained 30 steps on one batch: the loss falls as far as with torch's fp32 AdamW."""
    base = tiny_llama().to(dtype).train()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = {}
    for name, make in (("ours", AdamW8bit), ("fp32", torch.optim.AdamW)):
        model = copy.deepcopy(base)
        optimizer = make(model.parameters(), lr=3e-3, weight_decay=0.0)
        curve = []
        for _ in range(30):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(loss.item())
        losses[name] = curve
    ours, fp32 = losses["ours"], losses["fp32"]
    assert ours[-1] < 0.5 * ours[0]
    assert abs(ours[-1] - fp32[-1]) < 0.1 * (fp32[0] - fp32[-1])


@needs_bnb
def test_trainer_with_our_optimizer_follows_adamw_bnb_8bit(tmp_path):
    """Trainer(optimizers=(AdamW8bit(...), None)) and Trainer(optimizer_cls_and_kwargs=(AdamW8bit, {...})) against
    Trainer(optim="adamw_bnb_8bit") on the tiny model."""
    from real_stack_helpers import lm_dataset, step_logs
    from transformers import Trainer, TrainingArguments

    settings = dict(
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    base = tiny_llama().train()
    runs = {}
    for name in ("ours", "ours by class", "bnb"):
        model = copy.deepcopy(base)
        if name == "ours":
            args = TrainingArguments(output_dir=str(tmp_path / name), **settings)
            optimizer = AdamW8bit(model.parameters(), lr=1e-3, weight_decay=0.0, min_8bit_size=1024)
            trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(), optimizers=(optimizer, None))
        elif name == "ours by class":  # Trainer builds it, over its own parameter groups
            args = TrainingArguments(output_dir=str(tmp_path / "class"), **settings)
            optimizer = (AdamW8bit, dict(lr=1e-3, weight_decay=0.0, min_8bit_size=1024))
            trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(), optimizer_cls_and_kwargs=optimizer)
        else:
            args = TrainingArguments(output_dir=str(tmp_path / name), optim="adamw_bnb_8bit", **settings)
            trainer = Trainer(model=model, args=args, train_dataset=lm_dataset())
            trainer.create_optimizer()
            for group in trainer.optimizer.param_groups:
                group["weight_decay"] = 0.0
            trainer.optimizer.args.min_8bit_size = 1024
        trainer.train()
        runs[name] = step_logs(trainer)
    assert runs["ours"].keys() == runs["bnb"].keys() == {1, 2, 3, 4}
    assert runs["ours by class"] == runs["ours"]
    for step, loss in runs["bnb"].items():
        assert runs["ours"][step] == pytest.approx(loss, rel=1e-3)


def test_bad_arguments_and_state_dicts_raise():
    p = torch.nn.Parameter(torch.randn(8192))
    with pytest.raises(ValueError, match="betas"):
        AdamW8bit([p], betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="lr"):
        Lion8bit([p], lr=-1.0)
    with pytest.raises(ValueError, match="min_8bit_size"):
        AdamW8bit([p], min_8bit_size=-1)
    p.grad = torch.randn_like(p)
    saved = AdamW8bit([p])
    saved.step()
    for key, value, pattern in (
        ("state1", torch.zeros(10, dtype=torch.uint8), "state1 has 10 elements"),
        ("absmax1", torch.zeros(3), "absmax1 must be a float32 tensor of 32 values"),
        ("qmap2", torch.linspace(1, -1, 256), "qmap2 must be finite and sorted"),
        ("step", -3, "step must be an int"),
    ):
        state_dict = copy.deepcopy(saved.state_dict())
        state_dict["state"][0][key] = value
        with pytest.raises(ValueError, match=pattern):
            AdamW8bit([p]).load_state_dict(state_dict)


def test_float64_parameters_are_refused():
    p = torch.nn.Parameter(torch.randn(5000, dtype=torch.float64))
    p.grad = torch.randn_like(p)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        AdamW8bit([p]).step()


PAGED = {"AdamW8bit": PagedAdamW8bit, "Adam8bit": PagedAdam8bit, "Lion8bit": PagedLion8bit}


@pytest.mark.parametrize("name", PAGED)
def test_paged_optimizers_keep_the_unpaged_math_and_state(name):
    """Paging changes where a CUDA state lives, nothing else: on the CPU the paged optimizer is the unpaged one bit
    for bit, and its state_dict has the same keys and loads into either."""
    ours, their_class, kwargs = PAIRS[name]
    paged, paged_optimizer = trajectory(PAGED[name], kwargs, steps=4)
    plain, plain_optimizer = trajectory(ours, kwargs, steps=4)
    assert paged_optimizer.is_paged and not plain_optimizer.is_paged
    for a, b in zip(paged, plain):
        assert torch.equal(a, b)
    saved = paged_optimizer.state_dict()
    assert saved["state"][0].keys() == plain_optimizer.state_dict()["state"][0].keys()
    resumed, _ = trajectory(ours, kwargs, steps=2, seed=1, state_dict=saved, start=paged)
    resumed_paged, _ = trajectory(PAGED[name], kwargs, steps=2, seed=1, state_dict=saved, start=paged)
    for a, b in zip(resumed, resumed_paged):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="is_paged"):
        ours([torch.nn.Parameter(torch.zeros(4))], is_paged=1)


@needs_bnb
@pytest.mark.parametrize("name", PAGED)
def test_paged_state_dicts_load_both_ways_with_bitsandbytes(name):
    """Ours and bitsandbytes' paged optimizers read each other's state_dicts (on the CPU: parameters under its
    paging threshold, whose states it keeps in ordinary memory there)."""
    _, _, kwargs = PAIRS[name]
    # bitsandbytes keys per-parameter overrides by id(); Trainer registers some (32-bit embeddings) and a reused id
    # would carry one over to this test's parameters
    bnb.optim.GlobalOptimManager.get_instance().initialize()
    theirs = getattr(bnb.optim, f"Paged{name}")
    small = ((120, 100), (64,))
    for saver, loader in ((PAGED[name], theirs), (theirs, PAGED[name])):
        _, saved_by = trajectory(saver, kwargs, steps=2, shapes=small)
        params, loaded = trajectory(loader, kwargs, steps=2, shapes=small, state_dict=saved_by.state_dict())
        state = loaded.state[params[0]]
        assert state["state1"].dtype == torch.uint8 and int(state["step"]) == 4


@pytest.mark.cuda
@pytest.mark.parametrize("name", PAGED)
def test_paged_states_are_managed_memory_on_cuda(name):
    """On a GPU: the states of a parameter of at least PAGED_MIN_SIZE elements are in managed memory (those of a
    small one are not), the steps equal the unpaged optimizer's bit for bit, also after the states were evicted to
    host memory, and a loaded state_dict lands in managed memory again."""
    from pyfastpeft import _native
    from pyfastpeft.optim import PAGED_MIN_SIZE

    if _native.cuda is None:
        pytest.skip(f"pyfastpeft._cuda is not loaded: {_native.cuda_error}")
    ours, _, kwargs = PAIRS[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = ((512, 512), (64,))
    assert 512 * 512 >= PAGED_MIN_SIZE > 64
    start = [torch.randn(shape, device="cuda", generator=gen) * 0.02 for shape in shapes]
    grads = [[torch.randn(shape, device="cuda", generator=gen) * 0.01 for shape in shapes] for _ in range(4)]
    runs = {}
    for cls in (PAGED[name], ours):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = cls(params, **kwargs, min_8bit_size=16)
        for step, step_grads in enumerate(grads):
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
            if step == 1 and cls is PAGED[name]:  # evict: the next step must fetch the states back
                for t in (optimizer.state[params[0]]["state1"],):
                    _native.cuda.prefetch(t.data_ptr(), t.nbytes, -1, _native.cuda_stream(t))
        runs[cls] = (params, optimizer)
    (paged, paged_optimizer), (plain, _) = runs[PAGED[name]], runs[ours]
    for a, b in zip(paged, plain):
        assert torch.equal(a, b)
    big, small = (paged_optimizer.state[p] for p in paged)
    assert _native.cuda.is_managed(big["state1"].data_ptr())
    assert not _native.cuda.is_managed(small["state1"].data_ptr())
    reloaded = PAGED[name](paged, **kwargs, min_8bit_size=16)
    reloaded.load_state_dict(paged_optimizer.state_dict())
    assert _native.cuda.is_managed(reloaded.state[paged[0]]["state1"].data_ptr())


def test_exported():
    assert pyfastpeft.optim.AdamW8bit is AdamW8bit
