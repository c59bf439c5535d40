"""The users' own stack on a prepared tiny Llama, run by the real clients: transformers' Trainer (fp32 model, bf16
model, bf16 autocast over fp32, gradient accumulation, gradient checkpointing, checkpoint and resume, evaluate with
compute_metrics) and TRL's SFTTrainer with its default SFTConfig. Each prepared run starts from the same base and
the same initial adapters as a transformers + PEFT run (peft.get_peft_model, same LoRA settings, dropout 0, B
non-zero so the adapters count from the first step) under the same arguments, seed and data order, and logs the same
loss and gradient norm at every step. The adapter Trainer saves loads into PEFT with the same logits. (SFTTrainer
from TRL 1.15 computes its loss with its own fused LM head over the model's decoder, so there our fused loss is
bypassed and the test covers the adapters and patched modules under its defaults.)

prepare_model runs with quant=None here, so both sides hold the same dense base; NF4 is checked against itself
across a checkpoint. Tolerances, relative per step, with the largest differences measured on this CPU (adapter
seeds 1-3):
- fp32, with gradient accumulation or checkpointing too: loss and gradient norm 1e-5 (measured 1e-7 and 8e-7: the
  fused and unfused kernels sum in different orders);
- a bf16 model, and bf16 autocast over an fp32 model (Trainer's bf16=True, SFTConfig's default): loss 5e-3,
  gradient norm 1e-1 (measured 9e-4 and 4e-2 with Trainer's lr 1e-2, 6e-5 and 2e-3 with SFTConfig's 2e-5). The two
  sides round their bf16 products at different points, each as far from an fp32 run as the other (gradients ~1%
  apart at the first step), and Adam's normalised steps carry that into the next steps' gradients;
- a resumed run against the uninterrupted one: equal (losses, gradient norms and final adapters bit for bit);
- logits (evaluate's, and a saved adapter loaded into PEFT): 1e-5 (measured 5e-7 absolute).
"""

import copy
import dataclasses
import importlib.metadata

import pytest
import torch
import transformers
from packaging.version import Version
from real_stack_helpers import (
    LORA,
    VOCAB,
    adapter_state,
    base_model,
    lm_dataset,
    load_adapters,
    peft_lora_config,
    peft_reference,
    seed_adapters,
    step_logs,
    text_dataset,
    word_tokenizer,
)

import pyfastpeft
from pyfastpeft import _native

peft = pytest.importorskip("peft")


def installed_version(package):
    try:
        return Version(importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
        return None


TRL = installed_version("trl")
LOSS_LOGGED_TO_4_DECIMALS = Version(transformers.__version__) < Version("5.0.0")
FP32 = dict(loss=1e-5, grad_norm=1e-5)
BF16 = dict(loss=5e-3, grad_norm=1e-1)
STEPS = 4
_PREPARED = []


def prepare(model, quant=None, lora=LORA):
    """pyfastpeft.prepare_model with LORA, remembered so teardown unpatches it (a global RoPE patch, where the
    modeling file has no kernels wrapper, would otherwise reach the next test's reference model)."""
    pyfastpeft.prepare_model(model, quant=quant, lora=lora)
    _PREPARED.append(model)
    return model


@pytest.fixture(autouse=True)
def _fresh_state_per_test():
    """Unpatch what the test prepared (conftest puts back the ACCELERATE_* environment)."""
    yield
    while _PREPARED:
        pyfastpeft.unpatch_model(_PREPARED.pop())


def prepared_copy(base, adapters, quant=None):
    """base prepared, with the given initial adapters. Built after the PEFT run (see prepare)."""
    model = prepare(copy.deepcopy(base), quant)
    load_adapters(model, adapters)
    return model


def trainer(model, output_dir, eval_dataset=None, compute_metrics=None, **overrides):
    from transformers import Trainer, TrainingArguments

    settings = dict(
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    args = TrainingArguments(output_dir=str(output_dir), **{**settings, **overrides})
    return Trainer(
        model=model, args=args, train_dataset=lm_dataset(), eval_dataset=eval_dataset, compute_metrics=compute_metrics
    )


def assert_same_steps(ours, reference, tolerances):
    """Every step's loss and gradient norm within the relative tolerance of the reference run's. transformers before
    5.0 logs the loss rounded to 4 decimals (not the gradient norm): two roundings apart at most, 1e-4."""
    for key, rtol in tolerances.items():
        got, expected = step_logs(ours, key), step_logs(reference, key)
        assert got.keys() == expected.keys() == set(range(1, STEPS + 1)), key
        rounding = 1e-4 if key == "loss" and LOSS_LOGGED_TO_4_DECIMALS else 0.0
        for step in expected:
            assert abs(got[step] - expected[step]) <= rtol * abs(expected[step]) + rounding, (
                key,
                step,
                got[step],
                expected[step],
            )


def assert_saved_adapter_gives_the_same_logits(trainer_, model, base, directory, rtol=1e-5):
    """trainer.save_model writes a PEFT adapter: PeftModel.from_pretrained on a fresh copy of the base gives the
    trained prepared model's logits. A run with bf16=True leaves accelerate's autocast wrapper on model.forward (on
    any model, a PeftModel too); it comes off as accelerate unwraps for saving, so both sides compute in fp32."""
    trainer_.save_model(str(directory))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()
    model = trainer_.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    ids = torch.tensor(lm_dataset(rows=2, seed=3)["input_ids"])
    with torch.no_grad():
        expected = loaded(input_ids=ids).logits
        got = model.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol)


@pytest.mark.parametrize(
    "dtype, overrides, tolerances",
    [
        pytest.param(torch.float32, {}, FP32, id="fp32"),
        pytest.param(torch.bfloat16, {}, BF16, id="bf16-model"),
        pytest.param(torch.float32, {"bf16": True}, BF16, id="fp32-model-bf16-autocast"),
        pytest.param(torch.float32, {"gradient_accumulation_steps": 2}, FP32, id="gradient-accumulation"),
        pytest.param(torch.float32, {"gradient_checkpointing": True}, FP32, id="gradient-checkpointing"),
    ],
)
def test_trainer_logs_the_losses_of_transformers_and_peft_at_every_step(tmp_path, dtype, overrides, tolerances):
    base = base_model(dtype)
    reference, adapters = peft_reference(base)
    expected = trainer(reference, tmp_path / "peft", **overrides)
    expected.train()
    ours = prepared_copy(base, adapters)
    got = trainer(ours, tmp_path / "ours", **overrides)
    got.train()
    assert_same_steps(got, expected, tolerances)
    losses = step_logs(got)
    assert losses[STEPS] < losses[1]  # it learns


@pytest.mark.parametrize(
    "overrides, tolerances",
    [
        ({}, FP32),
        ({"bf16": True}, BF16),
        ({"gradient_checkpointing": True}, FP32),
        ({"bf16": True, "gradient_checkpointing": True}, BF16),
    ],
    ids=["fp32", "fp32-model-bf16-autocast", "gradient-checkpointing", "bf16-autocast-gradient-checkpointing"],
)
def test_trainer_with_lora_dropout_logs_the_losses_of_the_reference_backend(tmp_path, overrides, tolerances):
    """lora_dropout = 0.1, where PEFT's nn.Dropout would draw other masks: our native kernels (the dropout forward
    and the fused dA / dX backward, on AMX tiles where the host has them and the run is bf16) against our reference
    backend (PyTorch in PEFT's order of operations), both drawing the same Philox masks from Trainer's seed, from the
    same initial adapters. Gradient checkpointing recomputes each mask from the restored generator (in bf16 on an
    AMX host, the kept mask bits with it: 32 rows a step at r = 8 take that path)."""
    base = base_model()
    lora = dataclasses.replace(LORA, lora_dropout=0.1)
    adapters = seed_adapters(prepare(copy.deepcopy(base), lora=lora))
    runs = {}
    for backend in ("reference", "native"):
        model = prepare(copy.deepcopy(base), lora=lora)
        load_adapters(model, adapters)
        runs[backend] = trainer(model, tmp_path / backend, **overrides)
        with pyfastpeft.use_backend(backend):
            runs[backend].train()
    assert_same_steps(runs["native"], runs["reference"], tolerances)
    losses = step_logs(runs["native"])
    assert losses[STEPS] < losses[1]


def test_trainer_qlora_with_bf16_autocast_logs_the_losses_of_the_reference_backend(tmp_path, monkeypatch):
    """QLoRA (an NF4 base) with lora_dropout = 0.1 and bf16=True: the native kernels against our reference backend
    (PyTorch dequantize and matmul, PEFT's order of operations), the same Philox masks. On an AMX host each LoRA
    layer's forward is one NF4 tile GEMM with the up-projection in its epilogue (lora_nf4_matmul: 32 rows a step); with
    AMX or AVX512-BF16 the branch's x_d A^T and up-projection grads run in lora_down and lora_up_grads."""
    base = base_model()
    lora = dataclasses.replace(LORA, lora_dropout=0.1)
    adapters = seed_adapters(prepare(copy.deepcopy(base), "nf4", lora=lora))
    launched, launch = [], _native.launch
    monkeypatch.setattr(_native, "launch", lambda name, *args: (launched.append(name), launch(name, *args))[1])
    runs = {}
    for backend in ("reference", "native"):
        model = prepare(copy.deepcopy(base), "nf4", lora=lora)
        load_adapters(model, adapters)
        runs[backend] = trainer(model, tmp_path / backend, bf16=True)
        with pyfastpeft.use_backend(backend):
            runs[backend].train()
    assert ("lora_nf4_matmul" in launched) == _native.cpu.amx_in_use()
    # the branch's bf16 kernels: on AMX tiles, or by AVX512-BF16's dot products on a CPU without them
    in_kernels = _native.cpu.amx_in_use() or _native.cpu.avx512_bf16_in_use()
    assert ("lora_down" in launched) == in_kernels and ("lora_up_grads" in launched) == in_kernels
    assert_same_steps(runs["native"], runs["reference"], BF16)
    losses = step_logs(runs["native"])
    assert losses[STEPS] < losses[1]


@pytest.mark.parametrize(
    "overrides, tolerances", [({}, FP32), ({"bf16": True}, BF16)], ids=["fp32", "fp32-model-bf16-autocast"]
)
def test_trainer_trains_dora_as_peft_does_and_saves_a_peft_adapter(tmp_path, overrides, tolerances):
    """DoRA on every linear layer (LoraSettings(use_dora=True) against PEFT's use_dora=True): the same loss and
    gradient norm at every Trainer step, and the saved adapter gives PEFT the trained model's logits."""
    import dataclasses

    base = base_model()
    config = peft_lora_config()
    config.use_dora = True
    reference = peft.get_peft_model(copy.deepcopy(base), config)
    reference.enable_input_require_grads()
    adapters = seed_adapters(reference)
    assert any(".lora_magnitude_vector." in name for name in adapters)
    expected = trainer(reference, tmp_path / "peft", **overrides)
    expected.train()
    ours = copy.deepcopy(base)
    pyfastpeft.prepare_model(ours, quant=None, lora=dataclasses.replace(LORA, use_dora=True))
    _PREPARED.append(ours)
    load_adapters(ours, adapters)
    got = trainer(ours, tmp_path / "ours", **overrides)
    got.train()
    assert_same_steps(got, expected, tolerances)
    assert step_logs(got)[STEPS] < step_logs(got)[1]
    assert_saved_adapter_gives_the_same_logits(got, ours, base, tmp_path / "adapter")


def test_trainer_saved_adapter_loads_into_peft_with_the_same_logits(tmp_path):
    base = base_model()
    ours = prepare(copy.deepcopy(base))
    seed_adapters(ours)
    run = trainer(ours, tmp_path / "run")
    run.train()
    assert_saved_adapter_gives_the_same_logits(run, ours, base, tmp_path / "adapter")


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_resumed_trainer_run_logs_what_the_uninterrupted_run_logs(tmp_path, quant):
    """A run resumed from the step-2 checkpoint, on a freshly prepared model with other adapters (the checkpoint
    must replace them), logs steps 3 and 4 as the run that went on, and ends with the same adapters."""
    base = base_model()
    ours = prepare(copy.deepcopy(base), quant)
    seed_adapters(ours, seed=1)
    uninterrupted = trainer(ours, tmp_path / "run", save_strategy="steps", save_steps=2)
    uninterrupted.train()

    fresh = prepare(copy.deepcopy(base), quant)
    seed_adapters(fresh, seed=2)
    resumed = trainer(fresh, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    for key in ("loss", "grad_norm"):
        assert step_logs(resumed, key) == step_logs(uninterrupted, key), key
    trained = adapter_state(ours)
    for name, value in adapter_state(fresh).items():
        assert torch.equal(value, trained[name]), name


def test_evaluate_hands_compute_metrics_the_logits_peft_gives(tmp_path):
    """After training, Trainer.evaluate passes [rows, seq, vocab] logits to compute_metrics (the fused loss keeps
    them out of training only), equal to the PEFT run's, and the same eval loss."""
    seen = {}

    def metrics_for(side):
        def compute_metrics(prediction):
            seen[side] = prediction.predictions
            correct = prediction.predictions[:, :-1].argmax(-1) == prediction.label_ids[:, 1:]
            return {"accuracy": float(correct.mean())}

        return compute_metrics

    eval_rows = lm_dataset(rows=8, seed=2)
    base = base_model()
    reference, adapters = peft_reference(base)
    expected = trainer(
        reference,
        tmp_path / "peft",
        eval_dataset=eval_rows,
        compute_metrics=metrics_for("peft"),
        per_device_eval_batch_size=4,
    )
    expected.train()
    expected_metrics = expected.evaluate()
    ours = prepared_copy(base, adapters)
    got = trainer(
        ours,
        tmp_path / "ours",
        eval_dataset=eval_rows,
        compute_metrics=metrics_for("ours"),
        per_device_eval_batch_size=4,
    )
    got.train()
    metrics = got.evaluate()
    assert seen["ours"].shape == seen["peft"].shape == (8, 16, VOCAB)
    torch.testing.assert_close(torch.from_numpy(seen["ours"]), torch.from_numpy(seen["peft"]), rtol=1e-5, atol=1e-5)
    assert metrics["eval_loss"] == pytest.approx(expected_metrics["eval_loss"], rel=1e-5)
    assert metrics["eval_accuracy"] == expected_metrics["eval_accuracy"]


def sft_config(output_dir):
    """SFTConfig's defaults (bf16 autocast, lr 2e-5, and on newer TRL gradient checkpointing) plus what a
    few-second CPU run needs. use_cpu: without a GPU the default bf16=True is refused otherwise ("Your setup doesn't
    support bf16/gpu. You need to assign use_cpu ..."); logging_steps=1 (default 10) to compare every step."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
    )


@pytest.mark.skipif(TRL is None, reason="needs trl")
@pytest.mark.xfail(
    TRL is not None and TRL < Version("1.15.0"),
    strict=True,
    raises=TypeError,
    reason="prepare_model's fused loss returns logits=None in training, and SFTTrainer before TRL 1.15 "
    "computes its token accuracy from outputs.logits at every training step: TypeError "
    "'NoneType' object is not subscriptable at the first step (TRL 1.15+ runs its own fused "
    "LM head, which bypasses ours)",
)
def test_sft_trainer_default_config_logs_the_losses_of_peft_and_saves_a_peft_adapter(tmp_path):
    from trl import SFTTrainer

    base = base_model()
    expected = SFTTrainer(
        model=copy.deepcopy(base),
        args=sft_config(tmp_path / "peft"),
        train_dataset=text_dataset(),
        processing_class=word_tokenizer(),
        peft_config=peft_lora_config(),
    )
    adapters = seed_adapters(expected.model)
    expected.train()
    ours = prepared_copy(base, adapters)
    got = SFTTrainer(
        model=ours, args=sft_config(tmp_path / "ours"), train_dataset=text_dataset(), processing_class=word_tokenizer()
    )
    assert got.args.bf16  # the default autocast ran (and, on newer TRL, the default gradient checkpointing)
    got.train()
    assert_same_steps(got, expected, BF16)
    assert_saved_adapter_gives_the_same_logits(got, ours, base, tmp_path / "adapter")
