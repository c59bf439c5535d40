"""Model benchmark cases: one training step of a Llama-shaped LlamaForCausalLM, pyfastpeft against
transformers + PEFT."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib.util
from collections.abc import Sequence
from typing import Callable

import torch
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama

from pyfastpeft import LoraSettings, prepare_model
from pyfastpeft.bench.cases._common import HIDDEN, INTERMEDIATE, KV_HEADS, Q_HEADS, RMSNORM_EPS
from pyfastpeft.bench.cases.flce import VOCAB
from pyfastpeft.bench.harness import Case, Goal, Implementation, Workload

# A step is: forward with labels -> loss, backward, AdamW on the trainable (adapter) parameters, zero_grad. Both
# sides start from the same random weights and adapters and train on the same token batch. Ours is
# pyfastpeft.prepare_model (NF4 or dense frozen base, fused LoRA, our RMSNorm/SwiGLU/RoPE, the loss through
# fused_linear_cross_entropy); the reference is PEFT's LoRA over the transformers model, its base either dense or
# bitsandbytes Linear4bit (NF4, double quantization), as a QLoRA user builds it.


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A LlamaForCausalLM's sizes (heads: query / key-value) and the batch of token ids one step trains on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    seq_len: int
    batch: int = 1

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def label(self) -> str:
        return (
            f"L={self.layers} H={self.hidden} I={self.intermediate} heads={self.heads}/{self.kv_heads} "
            f"V={self.vocab} B={self.batch} S={self.seq_len}"
        )

    def config(self) -> LlamaConfig:
        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab,
            max_position_embeddings=self.seq_len,
            rms_norm_eps=RMSNORM_EPS,
        )


@dataclasses.dataclass(frozen=True)
class ModelComparison:
    """Which pair a case times; the names are the ones its shape label shows."""

    ours: str  # "QLoRA" or "LoRA": what prepare_model makes
    reference: str  # "bnb QLoRA" (bitsandbytes NF4 base) or "dense LoRA"

    @property
    def quant(self) -> str | None:
        return "nf4" if self.ours == "QLoRA" else None

    @property
    def reference_quantized(self) -> bool:
        return self.reference == "bnb QLoRA"


MODEL_SHAPES = {False: ModelShape(1024, 2816, 4, 16, 4, VOCAB, 512), True: ModelShape(1024, 2816, 2, 16, 4, VOCAB, 256)}
# One decoder layer of Llama-2-7B's shape with its embeddings and output layer.
MODEL_7B_LAYER = {
    False: ModelShape(HIDDEN, INTERMEDIATE, 1, Q_HEADS, KV_HEADS, VOCAB, 512),
    True: ModelShape(HIDDEN, INTERMEDIATE, 1, Q_HEADS, KV_HEADS, VOCAB, 128),
}
QLORA_VS_BNB = ModelComparison("QLoRA", "bnb QLoRA")
QLORA_VS_DENSE = ModelComparison("QLoRA", "dense LoRA")
LORA_VS_DENSE = ModelComparison("LoRA", "dense LoRA")
MODEL_LORA = LoraSettings(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
MODEL_LEARNING_RATE = 2e-4
MODEL_REFERENCE = "transformers LlamaForCausalLM + PEFT LoRA, base dense or bitsandbytes NF4 as the case says"
MODEL_SEED = 0
# prepare_model's RoPE patch swaps modeling_llama.apply_rotary_pos_emb module-wide, for every Llama in the
# process, the reference included: the reference's steps put transformers' own back while they run.
TRANSFORMERS_APPLY_ROTARY_POS_EMB = modeling_llama.apply_rotary_pos_emb


@contextlib.contextmanager
def transformers_rope():
    """modeling_llama.apply_rotary_pos_emb is transformers' own inside, whatever patch_model did around it."""
    original = TRANSFORMERS_APPLY_ROTARY_POS_EMB
    if original.__module__ != modeling_llama.__name__:
        raise RuntimeError(
            "pyfastpeft.bench.cases was imported after a Llama model was patched: it cannot tell "
            "transformers' apply_rotary_pos_emb from pyfastpeft's"
        )
    current = modeling_llama.apply_rotary_pos_emb
    modeling_llama.apply_rotary_pos_emb = original
    try:
        yield
    finally:
        modeling_llama.apply_rotary_pos_emb = current


class TrainingStep:
    """One training step of a causal LM on a fixed batch (labels = the inputs): forward -> loss, backward,
    AdamW on the parameters that require grad, zero_grad, all inside `context()`. A call returns the loss,
    detached; first_loss keeps the loss of the first call (the untrained model's)."""

    def __init__(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        self.model = model.train()
        self.input_ids = input_ids
        self.context = context
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        # fused: what transformers' Trainer builds by default (optim="adamw_torch_fused" from torch 2.8)
        self.optimizer = torch.optim.AdamW(self.parameters, lr=MODEL_LEARNING_RATE, fused=True)
        self.first_loss: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        with self.context():
            loss = self.model(input_ids=self.input_ids, labels=self.input_ids).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        if self.first_loss is None:
            self.first_loss = loss
        return loss


def _bench_device() -> torch.device:
    """The device python -m pyfastpeft.bench runs on: the GPU when one is visible."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bitsandbytes_4bit_unusable(device: torch.device) -> str | None:
    """None if bitsandbytes imports and a tiny Linear4bit (NF4) runs forward and backward on device; else why not."""
    try:
        import bitsandbytes

        layer = bitsandbytes.nn.Linear4bit(64, 16, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer = layer.to(device)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer(x).sum().backward()
        if not bool(torch.isfinite(x.grad).all()):
            return "bitsandbytes' Linear4bit gave a non-finite gradient"
    except Exception as error:  # noqa: BLE001 - any failure means the reference cannot run here
        return f"bitsandbytes' Linear4bit does not run on {device.type}: {type(error).__name__}: {error}"
    return None


def _bitsandbytes_4bit(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Replace, in place, every nn.Linear but the output layer by bitsandbytes' Linear4bit (NF4, double
    quantization, compute in the model's dtype), as transformers' BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype) loads it."""
    import bitsandbytes

    output_layer = model.get_output_embeddings()
    linears = [
        (path, module)
        for path, module in model.named_modules()
        if type(module) is torch.nn.Linear and module is not output_layer
    ]
    for path, linear in linears:
        quantized = bitsandbytes.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=dtype,
            compress_statistics=True,
            quant_type="nf4",
        )
        quantized.weight = bitsandbytes.nn.Params4bit(
            linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
        )
        if linear.bias is not None:
            quantized.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, quantized.to(linear.weight.device))
    model.is_loaded_in_4bit = True  # what transformers sets; PEFT then wraps the layers in its bnb LoRA layer


def model_training_steps(
    shape: ModelShape,
    comparison: ModelComparison,
    dtype: torch.dtype,
    device: torch.device,
    lora: LoraSettings = MODEL_LORA,
) -> tuple[TrainingStep, TrainingStep]:
    """(ours, reference): the same random LlamaForCausalLM twice, one through prepare_model, one through PEFT
    (after bitsandbytes 4-bit quantization where the comparison says so), the reference's adapters set to ours'
    initial values, each with its AdamW over the same token batch. Neither has stepped yet. The reference steps
    with transformers' RoPE (transformers_rope); pyfastpeft.unpatch_model(ours.model) undoes ours' patches."""
    import peft

    torch.manual_seed(MODEL_SEED)
    ours = modeling_llama.LlamaForCausalLM(shape.config()).to(device=device, dtype=dtype)
    reference = copy.deepcopy(ours)
    prepare_model(ours, quant=comparison.quant, lora=lora)
    if comparison.reference_quantized:
        _bitsandbytes_4bit(reference, dtype)
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        lora_bias=lora.lora_bias,
        modules_to_save=list(lora.modules_to_save) if lora.modules_to_save else None,
    )
    reference = peft.get_peft_model(reference, config)
    our_adapters = {name: tensor for name, tensor in ours.state_dict().items() if ".lora_" in name}
    with torch.no_grad():
        for name, tensor in reference.state_dict().items():
            if ".lora_" in name:
                tensor.copy_(our_adapters[name.removeprefix("base_model.model.")])
    generator = torch.Generator().manual_seed(MODEL_SEED)
    input_ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq_len), generator=generator).to(device)
    return TrainingStep(ours, input_ids), TrainingStep(reference, input_ids, transformers_rope)


def step_gemms(shape: ModelShape, dtype: torch.dtype, device: torch.device) -> Callable[[], None]:
    """The frozen products every training step of this model runs, whoever runs them, as torch.mm in dtype on
    operands of the step's shapes (a weight of its own for each layer): each layer's seven projections forward and
    their dX (but the first layer's q, k and v: their input, the frozen embeddings normed, needs no gradient), and
    the output layer's forward and dX. The adapters' products, attention and the rest are left out."""
    generator = torch.Generator().manual_seed(MODEL_SEED)
    tokens, kv = shape.tokens, shape.kv_heads * (shape.hidden // shape.heads)
    h, i = shape.hidden, shape.intermediate
    # (out, in, dX needed in the first layer) of q, k, v, o, gate, up, down
    projections = [
        (h, h, False),
        (kv, h, False),
        (kv, h, False),
        (h, h, True),
        (i, h, True),
        (i, h, True),
        (h, i, True),
    ]

    def operand(*size):
        return torch.randn(size, generator=generator).to(device=device, dtype=dtype)

    products = []  # (a, b, out): out = a @ b
    for layer in range(shape.layers + 1):
        last = layer == shape.layers  # the output layer
        for out_features, in_features, first_layer_dx in [(shape.vocab, h, True)] if last else projections:
            weight = operand(out_features, in_features)
            products.append((operand(tokens, in_features), weight.t(), operand(tokens, out_features)))
            if layer > 0 or first_layer_dx:
                products.append((operand(tokens, out_features), weight, operand(tokens, in_features)))

    def run() -> None:
        for a, b, out in products:
            torch.mm(a, b, out=out)

    return run


def model_workload(
    shape: ModelShape,
    comparison: ModelComparison,
    dtype: torch.dtype,
    device: torch.device,
    lora: LoraSettings = MODEL_LORA,
    floor: bool = False,
) -> Workload:
    """Both sides take one warm-up step here, so AdamW's state exists before anything is timed or measured:
    peak memory is then that of a steady-state step on both sides. No single kernel stands for a step. floor:
    time step_gemms too, the ceiling of the speedup goals."""
    ours, reference = model_training_steps(shape, comparison, dtype, device, lora)
    ours()
    reference()
    return Workload(
        ours=Implementation(ours, ours.parameters),
        reference=Implementation(reference, reference.parameters),
        kernels={},
        floor=Implementation(step_gemms(shape, dtype, device), ()) if floor else None,
        floor_name="the step's frozen GEMMs (each projection and the output layer, forward and dX)",
    )


def model_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    """Mode "forward": the closure timed is the whole training step. On the Llama-shaped model: ours QLoRA vs
    PEFT over bitsandbytes NF4 (only where bitsandbytes' Linear4bit works on the bench device; a printed note
    says why it is left out), ours QLoRA vs PEFT over the dense base, ours LoRA vs PEFT LoRA (both dense); on
    the 7B-shaped layer (bf16 only): ours QLoRA vs PEFT over the dense base."""
    if importlib.util.find_spec("peft") is None:
        print("model: cases left out: PEFT (the reference) is not installed")
        return []
    comparisons = [QLORA_VS_BNB, QLORA_VS_DENSE, LORA_VS_DENSE]
    unusable = bitsandbytes_4bit_unusable(_bench_device())
    if unusable:
        print(f"model: case {QLORA_VS_BNB.ours} vs PEFT {QLORA_VS_BNB.reference} left out: {unusable}")
        comparisons.remove(QLORA_VS_BNB)
    runs = [(MODEL_SHAPES[quick], comparison, dtype) for comparison in comparisons for dtype in dtypes]
    # The 7B-shaped layer in bf16 only (what QLoRA trains in): its fp32 step measured two to five times slower
    # than the bf16 one on 2 CPU cores, and a run takes a dozen steps per side (at seq 512 in the full run).
    runs += [(MODEL_7B_LAYER[quick], QLORA_VS_DENSE, dtype) for dtype in dtypes if dtype == torch.bfloat16]

    def goals(shape, comparison, dtype):
        return MODEL_GOALS.get(comparison, ()) if dtype == torch.bfloat16 and shape is MODEL_SHAPES[quick] else ()

    return [
        Case(
            "model",
            f"train step {comparison.ours} vs PEFT {comparison.reference} {shape.label}",
            dtype,
            "forward",
            MODEL_REFERENCE,
            functools.partial(model_workload, shape, comparison, dtype, floor=bool(goals(shape, comparison, dtype))),
            tokens=shape.tokens,
            goals=goals(shape, comparison, dtype),
            # headline: the Llama-shaped model in bf16, the goals' dtype (fp32's three steps took 47 s on 2 cores)
            headline=shape is MODEL_SHAPES[quick] and quick and dtype == torch.bfloat16,
        )
        for shape, comparison, dtype in runs
    ]


# The targets of a QLoRA training step on this CPU, in bf16 (what QLoRA trains in): tokens/s over the transformers +
# PEFT stacks (the step's time ratio) and peak memory against theirs.
MODEL_GOALS = {
    QLORA_VS_BNB: (Goal("speedup", 1.5), Goal("peak", 0.7)),
    QLORA_VS_DENSE: (Goal("speedup", 1.1), Goal("peak", 0.8)),
}
