"""Adapter directories as untrusted input: save_adapter never leaves a half-written adapter, load_adapter checks
every file, key, value, shape and dtype before the model changes (and undoes a change that fails), names the file
and key in every error, and matches rank_pattern / alpha_pattern keys in linear time."""

import json
import os
import random
import re
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
from helpers import tiny_llama

import pyfastpeft
from pyfastpeft.integrations.safe_regex import compile_pattern
from pyfastpeft.nn import LoRALinear

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def input_ids():
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))


def adapted_llama(r=4, targets=("q_proj", "v_proj"), seed=2):
    """A tiny Llama with a LoRA adapter whose B is not zero (a zero B would hide a wrong load)."""
    model = tiny_llama()
    pyfastpeft.add_lora(model, target_modules=targets, r=r, lora_alpha=2 * r)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def directory_bytes(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def snapshot(model):
    """Everything a failed load must leave as it was: the state dict, module types and trainability."""
    return (
        {key: value.clone() for key, value in model.state_dict().items()},
        [(name, type(module)) for name, module in model.named_modules()],
        [(name, parameter.requires_grad) for name, parameter in model.named_parameters()],
    )


def assert_unchanged(model, before):
    state, modules, trainable = snapshot(model)
    assert modules == before[1] and trainable == before[2]
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[key], before[0][key]) for key in state)


def edit_config(path, **changes):
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))
    return config_path


# ---- save_adapter is atomic ----------------------------------------------------------------------------------


def failing_writer(tensors, filename, metadata=None):
    """A weight writer that dies halfway through its file."""
    with open(filename, "wb") as file:
        file.write(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":')
    raise OSError("disk full")


def test_a_save_that_fails_writing_weights_leaves_the_previous_adapter_whole(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "adapter"
    old = adapted_llama(r=4)
    pyfastpeft.save_adapter(old, path)
    (path / "README.md").write_text("kept")
    before = directory_bytes(path)
    monkeypatch.setattr(safetensors.torch, "save_file", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        pyfastpeft.save_adapter(adapted_llama(r=2, seed=3), path)
    assert directory_bytes(path) == before
    assert os.listdir(tmp_path) == ["adapter"]  # no temporary directory left behind
    monkeypatch.undo()
    fresh = tiny_llama()
    pyfastpeft.load_adapter(fresh, path)
    torch.testing.assert_close(fresh(input_ids()).logits, old(input_ids()).logits)


def test_a_save_that_fails_while_renaming_puts_the_previous_files_back(tmp_path, monkeypatch):
    path = tmp_path / "adapter"
    pyfastpeft.save_adapter(adapted_llama(r=4), path)
    before = directory_bytes(path)
    replace, calls = os.replace, []

    def replace_failing_on_the_third_move(source, destination):
        calls.append(destination)
        if len(calls) == 3:  # the weights are in, the config is about to be replaced
            raise OSError("interrupted")
        replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_failing_on_the_third_move)
    with pytest.raises(OSError, match="interrupted"):
        pyfastpeft.save_adapter(adapted_llama(r=2, seed=3), path)
    monkeypatch.undo()
    assert directory_bytes(path) == before and os.listdir(tmp_path) == ["adapter"]


def test_a_failed_save_to_a_new_directory_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        pyfastpeft.save_adapter(adapted_llama(), tmp_path / "new")
    assert os.listdir(tmp_path) == []


def test_a_save_over_an_adapter_replaces_its_files_and_keeps_the_others(tmp_path):
    path = tmp_path / "adapter"
    pyfastpeft.save_adapter(adapted_llama(r=4), path)
    (path / "README.md").write_text("kept")
    new = adapted_llama(r=2, seed=3)
    pyfastpeft.save_adapter(new, path)
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((path / "adapter_config.json").read_text())["r"] == 2
    fresh = tiny_llama()
    pyfastpeft.load_adapter(fresh, path)
    torch.testing.assert_close(fresh(input_ids()).logits, new(input_ids()).logits)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        pyfastpeft.save_adapter(new, tmp_path / "file")


# ---- load_adapter is transactional ---------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """An adapter directory on q_proj and v_proj of both layers, r=4."""
    pyfastpeft.save_adapter(adapted_llama(), tmp_path)
    return tmp_path


def test_a_bad_pattern_value_for_a_later_layer_is_refused_before_the_model_changes(saved):
    config_path = edit_config(saved, alpha_pattern={r"layers\.1\.self_attn\.v_proj": "8"})
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(
        TypeError,
        match=re.escape(
            f"{config_path}: alpha_pattern['layers\\\\.1\\\\.self_attn\\\\.v_proj'] must be a number, got str '8'"
        ),
    ):
        pyfastpeft.load_adapter(model, saved)
    assert_unchanged(model, before)


def test_a_failure_while_changing_the_model_is_undone(saved, monkeypatch):
    model = tiny_llama()
    pyfastpeft.add_lora(model, target_modules=("q_proj",), r=2)  # q_proj gets a second adapter, v_proj a wrapper
    before = snapshot(model)
    add_adapter, calls = LoRALinear.add_adapter, []

    def add_adapter_failing_on_the_fourth_call(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 4:
            raise RuntimeError("out of memory")
        add_adapter(self, *args, **kwargs)

    monkeypatch.setattr(LoRALinear, "add_adapter", add_adapter_failing_on_the_fourth_call)
    with pytest.raises(RuntimeError, match="out of memory"):
        pyfastpeft.load_adapter(model, saved, adapter_name="second")
    assert len(calls) == 4
    assert_unchanged(model, before)
    assert all(list(module.lora_A) == ["default"] for module in model.modules() if isinstance(module, LoRALinear))


def test_a_string_for_a_bool_is_a_type_error_naming_the_file_and_key(saved):
    config_path = edit_config(saved, use_rslora="false")
    with pytest.raises(TypeError, match=re.escape(f"{config_path}: 'use_rslora' must be true or false, got str")):
        pyfastpeft.load_adapter(tiny_llama(), saved)
    edit_config(saved, use_rslora=False, use_dora="false")
    with pytest.raises(TypeError, match="'use_dora' must be true or false"):
        pyfastpeft.load_adapter(tiny_llama(), saved)


@pytest.mark.parametrize(
    "changes, error, message",
    [
        (dict(r="4"), TypeError, "'r' must be an int, got str"),
        (dict(r=True), TypeError, "'r' must be an int, got bool"),
        (dict(r=0), ValueError, "'r' must be >= 1, got 0"),
        (dict(lora_alpha=float("nan")), ValueError, "'lora_alpha' must be finite, got nan"),
        (dict(lora_dropout=1.5), ValueError, r"'lora_dropout' must be in \[0, 1.0\), got 1.5"),
        (dict(rank_pattern=["q_proj"]), TypeError, "'rank_pattern' must be an object"),
        (dict(rank_pattern={"q_proj": 2.5}), TypeError, r"rank_pattern\['q_proj'\] must be an int, got float"),
        (dict(rank_pattern={"q_proj(": 2}), ValueError, r"rank_pattern key 'q_proj\(' is refused: not a valid"),
        (dict(rank_pattern={r"(q)\3": 2}), ValueError, "is refused: groupref is not supported"),
        (dict(alpha_pattern={"(a{100}){100}": 2}), ValueError, "is refused: the pattern expands to more than"),
        (dict(modules_to_save="lm_head"), ValueError, "'modules_to_save' must be a list of module names"),
        (dict(trainable_token_indices=[3]), ValueError, r"sets \['trainable_token_indices'\]"),
        (dict(bias="everything"), ValueError, r"'bias' must be 'none', 'all' or 'lora_only', got 'everything'"),
    ],
)
def test_bad_config_values_name_the_file_and_key(saved, changes, error, message):
    config_path = edit_config(saved, **changes)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(error, match=re.escape(str(config_path)) + ".*" + message):
        pyfastpeft.load_adapter(model, saved)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"r": 4,', "is not valid JSON"),
        (b"\xff\xfe{}", "is not UTF-8 text"),
        (b"[1, 2]", "holds a JSON list, not an object"),
    ],
)
def test_a_corrupt_config_is_a_value_error_naming_the_file(saved, content, message):
    (saved / "adapter_config.json").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(saved / "adapter_config.json")) + ".*" + message):
        pyfastpeft.load_adapter(tiny_llama(), saved)


@pytest.mark.parametrize("corruption", ["truncated", "garbage", "empty", "huge header"])
def test_a_corrupt_safetensors_file_is_a_value_error_naming_the_file(saved, corruption):
    weights = saved / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "garbage": os.urandom(64),
            "empty": b"",
            "huge header": (2**62).to_bytes(8, "little") + data[8:],
        }[corruption]
    )
    with pytest.raises(ValueError, match=re.escape(str(weights)) + " is not a readable safetensors file"):
        pyfastpeft.load_adapter(tiny_llama(), saved)


def test_a_corrupt_bin_file_is_a_value_error_naming_the_file(saved):
    os.remove(saved / "adapter_model.safetensors")
    (saved / "adapter_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=re.escape(str(saved / "adapter_model.bin")) + " is not a readable"):
        pyfastpeft.load_adapter(tiny_llama(), saved)


def rewrite_weights(path, edit):
    from safetensors.torch import load_file, save_file

    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights)
    return weights


Q_PROJ_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (lambda t: t.__setitem__(Q_PROJ_A, t[Q_PROJ_A].to(torch.int32)), TypeError, "has dtype torch.int32"),
        (lambda t: t[Q_PROJ_A].__setitem__((0, 0), float("inf")), ValueError, "holds non-finite values"),
        (lambda t: t.__setitem__(Q_PROJ_A, t[Q_PROJ_A][0]), ValueError, r"has shape \(64,\); LoRA matrices are 2-D"),
        (
            lambda t: t.__setitem__(Q_PROJ_A.removeprefix("base_model.model."), t[Q_PROJ_A].clone()),
            ValueError,
            "name the same matrix",
        ),
        (
            lambda t: t.__setitem__(Q_PROJ_A.replace("q_proj", "q_proj.base_layer"), t[Q_PROJ_A].clone()),
            ValueError,
            "lacks lora_A or lora_B",
        ),
    ],
)
def test_bad_tensors_name_the_file_and_key(saved, edit, error, message):
    weights = rewrite_weights(saved, edit)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(error, match=re.escape(str(weights)) + ".*" + message):
        pyfastpeft.load_adapter(model, saved)
    assert_unchanged(model, before)


def test_a_key_inside_a_lora_layer_is_refused_and_the_model_still_works(saved):
    def rename_to_base_layer(tensors):
        for name in list(tensors):
            tensors[name.replace("q_proj.lora", "q_proj.base_layer.lora")] = tensors.pop(name)

    weights = rewrite_weights(saved, rename_to_base_layer)
    model = tiny_llama()
    pyfastpeft.add_lora(model, target_modules=("q_proj",), r=2)
    before = snapshot(model)
    expected = model(input_ids()).logits
    with pytest.raises(
        ValueError,
        match=re.escape(str(weights)) + ".*q_proj.base_layer.lora_A.weight' names "
        r"model\.layers\.\d\.self_attn\.q_proj\.base_layer, a part of the "
        "LoRALinear layer",
    ):
        pyfastpeft.load_adapter(model, saved, adapter_name="second")
    assert_unchanged(model, before)
    torch.testing.assert_close(model(input_ids()).logits, expected)


def test_a_bad_adapter_name_is_refused_before_the_model_changes(saved):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="adapter_name must be a non-empty module name"):
        pyfastpeft.load_adapter(model, saved, adapter_name="a.b")
    assert_unchanged(model, before)


# ---- pattern keys: PEFT's regex semantics, in linear time ----------------------------------------------------


def test_a_backtracking_pattern_key_loads_in_linear_time(saved):
    """re.match(r"(.*\\.)?((.*.*.*)*Z)$", path) runs for hours on a 31-character path. Run in a subprocess, so
    a regression fails on the timeout instead of hanging the suite."""
    edit_config(saved, rank_pattern={"(.*.*.*)*Z": 2})
    script = textwrap.dedent(f"""
        import pyfastpeft
        from helpers import tiny_llama
        loaded = pyfastpeft.load_adapter(tiny_llama(), {str(saved)!r})
        assert len(loaded) == 4, loaded
    """)
    tests_dir = os.path.join(REPO_ROOT, "tests")  # for helpers; the package itself is the installed one
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tempfile.gettempdir(),
    )
    assert result.returncode == 0, result.stderr[-2000:]


PATHS = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
    "model.layers.12.mlp.down_proj",
    "lm_head",
    "q_proj",
    "model.layers.1.self_attn.o_proj",
    "a\nb",
    "",
]
KEYS = [
    "q_proj",
    r"layers\.1\.self_attn\.v_proj",
    "layers.1.self_attn.v_proj",
    r"layers\.[0-3]\..*",
    "(q|v)_proj",
    "^model.*q_proj",
    r"\d+\.mlp\..*",
    "[^.]*_proj",
    "a{0,3}",
    "(o_proj)?",
    ".*",
    "x*?",
    r"\w+\Z",
    r"\s|\S",
    "^q_proj",
    "b$",
    r"[a-c\d]+",
    "(?:q|k){1,2}_proj",
    r"\A.*",
    "proj{2,}",
    "(a*)*",
    "(|a)+",
]


@pytest.mark.parametrize("key", KEYS)
def test_safe_patterns_answer_what_re_match_answers(key):
    pattern = rf"(.*\.)?({key})$"
    compiled = compile_pattern(pattern)
    for path in PATHS:
        assert compiled.match(path) == bool(re.match(pattern, path)), path


def test_safe_patterns_agree_with_re_on_random_patterns():
    atoms = ["a", "b", ".", r"\.", "[ab]", "[^a]", r"\d", "(a|b)", "(ab)", "()"]
    quantifiers = ["", "*", "+", "?", "{2}", "{1,2}", "*?", "{0,}"]
    generator = random.Random(0)
    texts = ["", "a", "b", "ab", "ba", "a.b", "aab", "1", "a1.b2", "abab.ba"]
    for _ in range(300):
        pattern = "".join(
            generator.choice(atoms) + generator.choice(quantifiers) for _ in range(generator.randint(1, 4))
        )
        compiled = compile_pattern(pattern)
        for text in texts:
            assert compiled.match(text) == bool(re.match(pattern, text)), (pattern, text)


@pytest.mark.parametrize(
    "pattern, message",
    [
        (r"(a)\1", "groupref"),
        ("(?=a)", "assert"),
        ("(?i)a", "flags"),
        ("(?i:a)", "inline flags"),
        (r"\ba", "word boundaries"),
        ("a" * 1001, "more than 1000"),
        ("((a{30}){30}){30}", "expands to more than"),
    ],
)
def test_safe_patterns_refuse_what_they_cannot_bound(pattern, message):
    with pytest.raises(ValueError, match=message):
        compile_pattern(pattern)
