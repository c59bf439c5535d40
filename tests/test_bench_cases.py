"""The `model` benchmark family on tiny sizes: both sides of every case are the same model on the same batch
(same loss before training, same number of trained parameters), a step runs on each, and the harness reports
tokens/s and peak memory for it while the tables of kernel families keep their columns."""

import dataclasses
import functools
import json
import sys

import pytest
import torch
from transformers.models.llama import modeling_llama

import pyfastpeft
from pyfastpeft.bench import cases, harness

pytest.importorskip("peft")

CPU = torch.device("cpu")
TINY_MODEL = cases.ModelShape(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=128, seq_len=16)
TINY_7B_LAYER = cases.ModelShape(hidden=128, intermediate=256, layers=1, heads=4, kv_heads=2, vocab=128, seq_len=8)
TINY_BUDGET = harness.Budget(warmup_runs=1, min_runs=3, max_runs=3, seconds=0.0)
# Relative gap of the untrained model's loss between the sides: the same dense weights (fp32 rounding
# apart); the same NF4 bytes (bitsandbytes' and ours are byte-compatible); NF4 against the dense weights.
FIRST_LOSS_GAP = {cases.LORA_VS_DENSE: 1e-5, cases.QLORA_VS_BNB: 1e-3, cases.QLORA_VS_DENSE: 0.05}


@pytest.fixture
def tiny_model_cases(monkeypatch):
    """The quick model cases on tiny sizes; every case builds through a recorder that unpatches our side's model
    at teardown (its RoPE patch is module-wide and would outlive the test)."""
    monkeypatch.setattr(cases.model, "MODEL_SHAPES", {True: TINY_MODEL, False: TINY_MODEL})
    monkeypatch.setattr(cases.model, "MODEL_7B_LAYER", {True: TINY_7B_LAYER, False: TINY_7B_LAYER})
    our_models, transformers_function = [], cases.TRANSFORMERS_APPLY_ROTARY_POS_EMB

    def recording_build(build, device):
        workload = build(device)
        our_models.append(workload.ours.forward.model)
        return workload

    yield [
        dataclasses.replace(case, build=functools.partial(recording_build, case.build))
        for case in cases.model_cases([torch.float32, torch.bfloat16], quick=True)
    ]
    for model in our_models:
        pyfastpeft.unpatch_model(model)
    assert modeling_llama.apply_rotary_pos_emb is transformers_function


def _comparison(case):
    return next(
        comparison
        for comparison in FIRST_LOSS_GAP
        if case.shape.startswith(f"train step {comparison.ours} vs PEFT {comparison.reference} ")
    )


def test_model_cases_are_the_four_comparisons_with_their_token_counts(tiny_model_cases, capsys):
    bitsandbytes_unusable = cases.bitsandbytes_4bit_unusable(CPU)
    labels = [case.label for case in tiny_model_cases]
    expected = [
        f"model train step {ours} vs PEFT {reference} {TINY_MODEL.label} {dtype} forward"
        for ours, reference in (("QLoRA", "bnb QLoRA"), ("QLoRA", "dense LoRA"), ("LoRA", "dense LoRA"))
        for dtype in ("fp32", "bf16")
        if not (bitsandbytes_unusable and reference == "bnb QLoRA")
    ]
    expected.append(f"model train step QLoRA vs PEFT dense LoRA {TINY_7B_LAYER.label} bf16 forward")
    assert labels == expected
    assert [case.tokens for case in tiny_model_cases] == [16] * (len(expected) - 1) + [8]
    if bitsandbytes_unusable:
        assert "left out" in capsys.readouterr().out


@pytest.mark.parametrize("comparison", list(FIRST_LOSS_GAP), ids=lambda c: f"{c.ours} vs {c.reference}")
def test_both_sides_start_from_the_same_loss_and_train_the_same_parameters(tiny_model_cases, comparison):
    fp32_cases = [case for case in tiny_model_cases if case.dtype == torch.float32 and _comparison(case) == comparison]
    if not fp32_cases:
        pytest.skip(f"bitsandbytes cannot run here: {cases.bitsandbytes_4bit_unusable(CPU)}")
    [case] = fp32_cases
    workload = case.build(CPU)  # runs the warm-up step of each side
    ours, reference = workload.ours.forward, workload.reference.forward
    assert ours.first_loss.isfinite() and reference.first_loss.isfinite()
    gap = abs(ours.first_loss.item() - reference.first_loss.item()) / reference.first_loss.item()
    assert gap <= FIRST_LOSS_GAP[comparison], (ours.first_loss, reference.first_loss)
    # A [r, in] and B [out, r] on q, k, v, o, gate, up, down of each layer (k, v: out = kv_heads * head_dim)
    hidden, kv_dim = TINY_MODEL.hidden, TINY_MODEL.kv_heads * TINY_MODEL.hidden // TINY_MODEL.heads
    per_layer = 2 * (2 * hidden) + 2 * (hidden + kv_dim) + 3 * (hidden + TINY_MODEL.intermediate)
    for implementation in (workload.ours, workload.reference):
        assert len(implementation.leaves) == 2 * 7 * TINY_MODEL.layers
        assert sum(p.numel() for p in implementation.leaves) == cases.MODEL_LORA.r * per_layer * TINY_MODEL.layers
    for step in (ours, reference):
        assert step.optimizer.state  # AdamW's state exists before the bench measures anything
        assert step().isfinite()


def test_the_reference_steps_with_transformers_rope_and_ours_with_the_fused_one(tiny_model_cases, monkeypatch):
    calls, transformers_function = [], cases.TRANSFORMERS_APPLY_ROTARY_POS_EMB

    @functools.wraps(transformers_function)
    def counted(*args, **kwargs):
        calls.append(1)
        return transformers_function(*args, **kwargs)

    [case] = [
        case for case in tiny_model_cases if _comparison(case) == cases.LORA_VS_DENSE and case.dtype == torch.float32
    ]
    workload = case.build(CPU)
    monkeypatch.setattr(cases.model, "TRANSFORMERS_APPLY_ROTARY_POS_EMB", counted)
    workload.reference.forward()
    assert len(calls) == TINY_MODEL.layers
    workload.ours.forward()
    assert len(calls) == TINY_MODEL.layers
    assert modeling_llama.apply_rotary_pos_emb is not counted  # ours' patch is back after the reference's step


def test_the_7b_layer_case_runs_a_step_on_each_side(tiny_model_cases):
    [case] = [case for case in tiny_model_cases if TINY_7B_LAYER.label in case.shape]
    workload = case.build(CPU)
    gap = abs(workload.ours.forward.first_loss.item() - workload.reference.forward.first_loss.item())
    assert gap <= 0.05 * workload.reference.forward.first_loss.item()
    assert workload.ours.forward().isfinite() and workload.reference.forward().isfinite()


def test_run_case_reports_tokens_per_second_and_peak_memory_without_a_kernel_figure(tiny_model_cases, tmp_path):
    [case] = [
        case for case in tiny_model_cases if _comparison(case) == cases.LORA_VS_DENSE and case.dtype == torch.float32
    ]
    result = harness.run_case(case, CPU, TINY_BUDGET)
    assert result.kernel is None
    for side in result.ours + [result.reference]:
        assert side.peak_bytes > 0 and side.saved_bytes > 0
        expected = case.tokens / (side.timing.median_ms * 1e-3)
        assert result.tokens_per_s[side.backend] == pytest.approx(expected)
    table = harness.format_table("model", [result], copy_gbps=10.0)
    header, _, row = table.splitlines()[1:]
    goal = harness.goal_cells(result, result.ours[0].backend)
    assert header.split()[-3:] == ["tok/s", "ours/ref", "goal"] and row.endswith(goal)
    assert row.removesuffix(goal).split()[-3:-1] == ["-", "-"]  # no GB/s, no % copy
    path = tmp_path / "model.json"
    harness.write_json(path, {}, [result])
    [written] = json.loads(path.read_text())["cases"]
    assert "kernel" not in written and set(written["tokens_per_s"]) == {"native", "reference"}


def test_a_kernel_is_judged_against_a_copy_of_its_bytes_timed_in_turn_with_it(monkeypatch):
    monkeypatch.setattr(harness, "COPY_BUFFER_BYTES", 4 * harness.MIB)
    monkeypatch.setattr(harness, "ROTATION_BYTES", harness.MIB)
    src = torch.randn(1 << 16)
    dst = torch.empty_like(src)
    call = harness.KernelCall(lambda: dst.copy_(src), 2 * src.nbytes)
    workload = harness.Workload(ours=None, reference=None, kernels={"forward": lambda: call})
    timed = []

    def time_all(runnables, device, budget, use_graph=False):
        timed.append(len(runnables))
        for runnable in runnables:
            runnable.step()
        return [harness.Timing(2.0, 2.0, 2.0, runs=1), harness.Timing(1.0, 1.0, 1.0, runs=1)]

    monkeypatch.setattr(harness, "time_all", time_all)
    kernel = harness.measure_kernel(workload, "forward", CPU, TINY_BUDGET)
    assert timed == [2]  # the kernel and the copy in one call: in turn
    assert kernel.gbps == pytest.approx(call.bytes_moved / 2e-3 / 1e9)
    assert kernel.copy_gbps == pytest.approx(call.bytes_moved / 1e-3 / 1e9)  # the same bytes in half the time
    assert kernel.fraction_of_copy == pytest.approx(0.5)
    copy, copy_bytes = harness.copy_beside(3 << 20, CPU)
    assert copy_bytes == 3 << 20


@pytest.mark.skipif(harness.resource is None, reason="getrusage is POSIX")
def test_cpu_timings_count_each_side_s_page_faults():
    import mmap

    pages = 256  # 1 MiB: too small for a transparent huge page, so one fault a page on any host

    def fresh_pages():  # every run maps new anonymous memory and touches each page once
        with mmap.mmap(-1, pages * mmap.PAGESIZE) as memory:
            for page in range(pages):
                memory[page * mmap.PAGESIZE] = 1

    faulting, quiet = harness.time_cpu([harness.Runnable(fresh_pages), harness.Runnable(lambda: None)], TINY_BUDGET)
    assert faulting.minor_faults >= pages and quiet.minor_faults < pages / 10
    assert faulting.system_ms >= 0.0 and quiet.system_ms >= 0.0


def test_a_side_that_spends_its_runs_in_the_kernel_is_named_after_the_run():
    quiet = harness.Timing(100.0, 99.0, 101.0, runs=7, minor_faults=2.0, system_ms=1.0)
    faulting = harness.Timing(200.0, 190.0, 210.0, runs=7, minor_faults=50000.0, system_ms=80.0)

    goal = [dict(goal=">=2x", metric="speedup", bound=2.0, backend="native", value=2.0, met=True)]

    def result(reference_timing, goals=goal):
        ours = harness.SideResult("native", quiet, peak_bytes=1, saved_bytes=0)
        reference = harness.SideResult("reference", reference_timing, peak_bytes=1, saved_bytes=0)
        return harness.CaseResult(
            "dora", "M=8", "bf16", "both", "PEFT", [ours], reference, None, {"native": 2.0}, goals=goals
        )

    notes = harness.kernel_time_notes([result(quiet), result(faulting), result(faulting, goals=[])]).splitlines()
    assert len(notes) == 2  # the title, then only the case with goals whose reference faulted
    assert (
        notes[1] == "  dora M=8 bf16 both: native 1.0 ms (2 faults) of 100.0, reference 80.0 ms (50000 faults) of 200.0"
    )
    assert harness.kernel_time_notes([result(quiet)]) == ""


def test_tables_and_json_of_kernel_families_keep_their_columns(tmp_path):
    timing = harness.Timing(1.0, 0.9, 1.1, runs=7)
    side = harness.SideResult("native", timing, peak_bytes=1 << 20, saved_bytes=0)
    reference = harness.SideResult("reference", timing, peak_bytes=1 << 20, saved_bytes=0)
    kernel = harness.KernelResult(timing, bytes_moved=1 << 20, rotation_sets=1, gbps=1.0, fraction_of_copy=0.1)
    result = harness.CaseResult(
        "rmsnorm", "T=4 N=8", "fp32", "forward", "transformers LlamaRMSNorm", [side], reference, kernel, {"native": 1.0}
    )
    lines = harness.format_table("rmsnorm", [result], copy_gbps=10.0).splitlines()
    columns = harness.TABLE_HEADER + (harness.GOAL_HEADER,)
    assert lines[1].split() == [word for column in columns for word in column.split()]
    assert lines[3].split()[-3:] == ["1.0", "10%", "-"]  # GB/s, % copy, no goal
    path = tmp_path / "rmsnorm.json"
    harness.write_json(path, {}, [result])
    [written] = json.loads(path.read_text())["cases"]
    assert "tokens_per_s" not in written and written["kernel"]["gbps"] == 1.0


def test_the_experts_case_compares_equal_computations():
    """Both sides of the LoRA-on-experts case compute the same outputs and gradients (fp32, small shapes)."""
    from pyfastpeft.bench.cases.lora import _experts_block, _lora_experts_workload

    if _experts_block(8, 8, torch.float32, CPU) is None:
        pytest.skip("transformers < 5 has no 3-D experts")

    workload = _lora_experts_workload(16, 32, 48, torch.float32, CPU)
    results = []
    for side in (workload.ours, workload.reference):
        for leaf in side.leaves:
            leaf.grad = None
        out = side.forward()
        out.square().sum().backward()
        results.append((out.detach(), [leaf.grad.clone() for leaf in side.leaves]))
    (ours, our_grads), (theirs, their_grads) = results
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for ours_grad, their_grad in zip(our_grads, their_grads):
        torch.testing.assert_close(ours_grad, their_grad, rtol=1e-4, atol=1e-6)


def test_a_broken_case_and_a_skipped_one_are_recorded_and_the_rest_still_timed(tmp_path, monkeypatch, capsys):
    """One case raising (a kernel error, say) or skipping (a library version that lacks what it needs) costs that
    case alone: the run goes on, the JSON names them with their reasons, and a failure makes the exit status 1."""
    from pyfastpeft.bench import __main__ as bench_main

    [good, *_] = cases.select_cases(["rmsnorm"], [torch.float32], "quick")

    def broken(device):
        raise RuntimeError("kernel exploded")

    def skipped(device):
        raise harness.CaseSkipped("needs a newer library")

    chosen = [
        dataclasses.replace(good, shape="broken", build=broken),
        dataclasses.replace(good, shape="skipped", build=skipped),
        good,
    ]
    monkeypatch.setattr(bench_main, "select_cases", lambda *args: chosen)
    monkeypatch.setattr(harness, "QUICK_BUDGET", TINY_BUDGET)
    status = bench_main.main(["--quick", "--family", "rmsnorm", "--dtype", "fp32", "--no-plot", "--out", str(tmp_path)])
    assert status == 1
    [written] = tmp_path.glob("*.json")
    document = json.loads(written.read_text())
    assert [case["shape"] for case in document["cases"]] == [good.shape]
    assert [(entry["status"], entry["reason"]) for entry in document["not_run"]] == [
        ("failed", "RuntimeError: kernel exploded"),
        ("skipped", "needs a newer library"),
    ]
    assert "failed: rmsnorm broken fp32" in capsys.readouterr().out


def test_the_backends_timed_are_those_a_user_of_each_device_gets(monkeypatch):
    """CPU: native. CUDA: native and Triton forced in turn; Triton alone where no native CUDA kernel exists
    (forced native would time the reference); auto for a whole model, whose layers span families."""
    available = {name: {"available": True, "detail": ""} for name in ("reference", "cpu_native", "cuda_native")}
    monkeypatch.setattr(pyfastpeft, "backends", lambda: {**available, "triton": {"available": True, "detail": ""}})
    cuda = torch.device("cuda")
    assert harness.our_backends(CPU, "model") == harness.our_backends(CPU, "lora") == ("native",)
    assert harness.our_backends(cuda, "swiglu") == ("native", "triton")
    assert harness.our_backends(cuda, "lora") == harness.our_backends(cuda, "quantize") == ("triton",)
    assert harness.our_backends(cuda, "model") == ("auto",)


def _result(speedup: float, peak_ratio: float, copy_fraction: float | None, backend: str = "native"):
    """A CaseResult with one backend of ours: `speedup` x the reference, `peak_ratio` of its peak memory and a
    kernel at `copy_fraction` of copy bandwidth (None: no kernel figure)."""
    reference = harness.SideResult("reference", harness.Timing(speedup, speedup, speedup, 7), 1000, 0)
    ours = harness.SideResult(backend, harness.Timing(1.0, 1.0, 1.0, 7), round(1000 * peak_ratio), 0)
    kernel = None
    if copy_fraction is not None:
        kernel = harness.KernelResult(ours.timing, 1, 1, copy_fraction * 10, copy_fraction)
    return harness.CaseResult("nf4", "M=1", "bf16", "forward", "dense", [ours], reference, kernel, {backend: speedup})


@pytest.mark.parametrize(
    "goal, met_by, missed_by",
    [
        (harness.Goal("speedup", 2.5), _result(2.6, 1.0, None), _result(2.4, 1.0, None)),
        (harness.Goal("time", 1.2), _result(1 / 1.15, 1.0, None), _result(1 / 1.25, 1.0, None)),
        (harness.Goal("peak", 0.25), _result(1.0, 0.24, None), _result(1.0, 0.26, None)),
        (harness.Goal("copy", 0.7), _result(1.0, 1.0, 0.71), _result(1.0, 1.0, 0.69)),
    ],
)
def test_a_goal_is_met_on_its_side_of_the_bound_and_missed_on_the_other(goal, met_by, missed_by):
    for result, met in ((met_by, True), (missed_by, False)):
        [entry] = harness.judge_goals([goal], result, CPU)
        assert entry["met"] is met and entry["backend"] == "native" and entry["goal"] == goal.text
        result.goals = [entry]
        assert harness.goal_cells(result, "native") == f"{goal.text} {'ok' if met else 'MISS'}"
    summary = harness.goal_summary([met_by, missed_by]).splitlines()
    assert summary[0] == "goals: 1 of 2 met, missed:" and len(summary) == 2
    assert summary[1].startswith("  MISS nf4 M=1 bf16 forward [native]: ") and summary[1].endswith("(ref: dense)")


def test_goals_are_cpu_targets_left_unjudged_on_a_gpu_and_where_a_case_has_no_figure():
    judged = harness.judge_goals([harness.Goal("speedup", 2.0)], _result(3.0, 1.0, None), torch.device("cuda"))
    assert [entry["met"] for entry in judged] == [None]
    [no_kernel] = harness.judge_goals([harness.Goal("copy", 0.6)], _result(3.0, 1.0, None), CPU)
    assert no_kernel["value"] is None and no_kernel["met"] is None
    result = _result(3.0, 1.0, None)
    result.goals = judged + [no_kernel]
    assert harness.goal_cells(result, "native") == ">=2x -, >=60% copy -"
    assert harness.goal_summary([result]) == ""
    with pytest.raises(ValueError, match="metric"):
        harness.Goal("throughput", 1.0)


def test_the_default_run_is_each_familys_headline_cases_and_full_is_the_whole_grid():
    dtypes = list(cases.DTYPES.values())
    families = list(cases.FAMILIES)
    quick, headline, full = (cases.select_cases(families, dtypes, scope) for scope in cases.SCOPES)
    labels = {scope: [case.label for case in chosen] for scope, chosen in zip(cases.SCOPES, (quick, headline, full))}
    for scope, chosen in labels.items():
        assert len(chosen) == len(set(chosen)), f"{scope}: two cases share a label (their results would mix)"
    assert set(labels["headline"]) <= set(labels["quick"]) | set(labels["full"])
    assert {case.family for case in headline} == set(families)
    assert all(case.headline for case in headline) and len(headline) < len(full) / 2
    # the headline run's recorded seconds (2-core host) keep it near the ten minutes the README promises
    estimate = sum(harness.estimated_seconds(case, "headline") for case in headline)
    assert estimate < 10.5 * 60, f"the default run is estimated at {estimate / 60:.1f} min"
    with pytest.raises(ValueError, match="scope"):
        cases.select_cases(families, dtypes, "everything")


def test_the_eta_starts_from_the_recorded_seconds_and_scales_by_the_cases_run_so_far():
    eta = harness.Eta([10.0, 20.0, 30.0])
    assert eta.remaining() == 60.0
    eta.done(0, 20.0)  # twice as slow as recorded
    assert eta.remaining() == 100.0
    eta.done(2, 30.0)  # 50 s for 40 recorded
    assert eta.remaining() == 25.0


def test_a_run_without_matplotlib_writes_its_json_and_says_the_chart_was_skipped(tmp_path, monkeypatch, capsys):
    from pyfastpeft.bench import __main__ as bench_main

    [good, *_] = cases.select_cases(["rmsnorm"], [torch.float32], "quick")
    monkeypatch.setattr(bench_main, "select_cases", lambda *args: [good])
    monkeypatch.setattr(harness, "QUICK_BUDGET", TINY_BUDGET)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    status = bench_main.main(["--quick", "--family", "rmsnorm", "--dtype", "fp32", "--out", str(tmp_path)])
    assert status == 0
    assert [path.suffix for path in tmp_path.iterdir()] == [".json"]
    out = capsys.readouterr().out
    assert "matplotlib is not installed: the speedup chart was skipped" in out
    assert "1 quick cases on" in out and "estimated" in out
    run = json.loads(next(tmp_path.iterdir()).read_text())["run"]
    assert run["scope"] == "quick" and run["host_kind"] in ("amx", "avx512", "avx2", "other")
    assert isinstance(run["cpu_isa_flags"], list) and run["cpu"]


@pytest.mark.parametrize(
    "variant, rows, op_name",
    [
        ("base", 1, "lora_forward"),
        ("qlora", 1, "lora_nf4_no_grad"),
        ("qlora", 9, "lora_nf4_forward"),
        ("dense", 1, "lora_nf4_no_grad"),
    ],
)
def test_the_kernel_figure_of_a_lora_variant_is_our_side_of_it(variant, rows, op_name, monkeypatch):
    """The bandwidth column belongs to ours: over the NF4 base for QLoRA (decode reads the packed weight), over the
    dense one for the LoRA-overhead case. A decode step's forward (up to 8 rows) is what the layer runs without
    gradients: lora_nf4_no_grad, which keeps no xa."""
    from pyfastpeft.bench.cases import lora as lora_cases
    from pyfastpeft.ops import lora as lora_ops

    called = []
    for name in ("lora_forward", "lora_nf4_forward", "lora_nf4_no_grad"):
        op = getattr(lora_ops, name)
        monkeypatch.setattr(lora_ops, name, lambda *args, op=op, name=name: called.append(name) or op(*args))
    workload = lora_cases._lora_variant_workload(variant, rows, 64, 128, 4, 0.05, torch.float32, CPU)
    call = workload.kernels["forward"]()
    outputs = call.run()
    assert called == [op_name]
    y = outputs if op_name == "lora_nf4_no_grad" else outputs[0]
    assert y.shape == (rows, 64)
    if op_name != "lora_nf4_no_grad":
        assert outputs[1].shape == (rows, 4)
    packed_bytes = 64 * 128 // 2
    assert (call.bytes_moved < 64 * 128 * 4) == (variant != "base")  # the 4-bit weight, not fp32's
    assert call.bytes_moved > packed_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_dense_bf16_baselines_compute_the_layer_they_stand_for(dtype):
    """NF4 and int8 against a dense bf16 layer: the same weight (up to its quantization), bf16 activations."""
    from pyfastpeft.bench.cases.int8 import _int8_workload
    from pyfastpeft.bench.cases.nf4 import _nf4_dense_workload

    for workload, tolerance in (
        (_nf4_dense_workload(4, 64, 128, dtype, CPU), 0.15),  # NF4's error on a Gaussian weight: ~0.1 normwise
        (_int8_workload(4, 64, 128, 0.01, "dense bf16", dtype, CPU), 0.03),
    ):
        ours, reference = workload.ours.forward(), workload.reference.forward()
        assert ours.dtype == dtype and reference.dtype == torch.bfloat16
        error = (ours.float() - reference.float()).norm() / reference.float().norm()
        assert error < tolerance


def test_a_speedup_goal_with_a_floor_records_its_ceiling_and_the_summary_says_what_the_floor_is():
    result = _result(1.5, 0.5, None)  # the reference took 1.5 ms
    result.floor = harness.FloorResult("the GEMMs", harness.Timing(1.2, 1.2, 1.2, 7))
    speedup, peak = harness.judge_goals([harness.Goal("speedup", 2.0), harness.Goal("peak", 0.6)], result, CPU)
    assert speedup["met"] is False and speedup["ceiling"] == pytest.approx(1.5 / 1.2)
    assert peak["met"] is True and "ceiling" not in peak
    result.goals = [speedup, peak]
    assert harness.goal_cells(result, "native") == ">=2x MISS (ceiling 1.25x), peak <=0.6x ok"
    summary = harness.goal_summary([result]).splitlines()
    assert summary[1].endswith("goal >=2x (ceiling 1.25x) (ref: dense)")
    assert summary[2] == "    ceiling: the reference's time / that of the GEMMs, timed in turn with both"
    edge = _result(1.996, 0.5, None)
    edge.goals = harness.judge_goals([harness.Goal("speedup", 2.0)], edge, CPU)
    assert ": speedup 1.996x, goal >=2x (ref: dense)" in harness.goal_summary([edge])
    unjudged = harness.judge_goals([harness.Goal("speedup", 2.0)], result, torch.device("cuda"))
    result.goals = unjudged
    assert harness.goal_cells(result, "native") == ">=2x -"


def test_run_case_times_a_workloads_floor_in_turn_with_the_sides_and_writes_it(tmp_path):
    x = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(48, 32)
    floor_calls = []

    def floor():
        floor_calls.append(1)
        return torch.nn.functional.linear(x, weight)

    workload = harness.Workload(
        ours=harness.Implementation(lambda: torch.nn.functional.linear(x, weight) * 2, (x,)),
        reference=harness.Implementation(lambda: torch.nn.functional.linear(x, weight).mul(2).add(0), (x,)),
        kernels={},
        floor=harness.Implementation(floor, (x,)),
        floor_name="one GEMM",
    )
    case = harness.Case("toy", "M=64", torch.float32, "both", "eager", lambda device: workload,
                        goals=(harness.Goal("speedup", 100.0),))  # fmt: skip
    result = harness.run_case(case, CPU, TINY_BUDGET)
    assert result.floor.name == "one GEMM" and result.floor.timing.runs == 3 and len(floor_calls) >= 4
    [entry] = result.goals
    assert entry["ceiling"] == pytest.approx(result.reference.timing.median_ms / result.floor.timing.median_ms)
    path = tmp_path / "toy.json"
    harness.write_json(path, {}, [result])
    [written] = json.loads(path.read_text())["cases"]
    assert written["floor"]["name"] == "one GEMM" and written["goals"][0]["ceiling"] == entry["ceiling"]


def test_step_gemms_are_the_frozen_products_of_a_step(monkeypatch):
    shapes = []
    monkeypatch.setattr(torch, "mm", lambda a, b, out: shapes.append((tuple(a.shape), tuple(b.shape), out.dtype)))
    cases.model.step_gemms(TINY_MODEL, torch.bfloat16, CPU)()
    t, h, i, v = TINY_MODEL.tokens, TINY_MODEL.hidden, TINY_MODEL.intermediate, TINY_MODEL.vocab
    kv = TINY_MODEL.kv_heads * h // TINY_MODEL.heads
    per_layer = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # (out, in) of q, k, v, o, gate, up, down
    expected = []
    for layer in range(TINY_MODEL.layers):
        for index, (n, k) in enumerate(per_layer):
            expected.append(((t, k), (k, n), torch.bfloat16))  # forward
            if layer > 0 or index >= 3:  # dX, but for the first layer's q, k and v
                expected.append(((t, n), (n, k), torch.bfloat16))
    expected += [((t, h), (h, v), torch.bfloat16), ((t, v), (v, h), torch.bfloat16)]
    assert shapes == expected
