"""pyfastpeft.perplexity against transformers' documented sliding-window recipe run with the model's own
forward (logits materialized), on tiny random Llama and Gemma-2 (its final logit softcap) models."""

import math

import pytest
import torch
import transformers
from helpers import TINY_DECODER, tiny_llama

import pyfastpeft


def recipe_perplexity(model, input_ids, max_length, stride):
    """transformers' guide "Perplexity of fixed-length models", counting each window's scored tokens exactly
    (the model shifts the labels, so a window's first label is never scored)."""
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        window = input_ids[:, begin:end]
        target_ids = window.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(window, labels=target_ids).loss
        num_valid = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss.item() * num_valid
        n_tokens += num_valid
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


def tiny_gemma2():
    torch.manual_seed(0)
    config = transformers.Gemma2Config(**TINY_DECODER, head_dim=16, final_logit_softcapping=3.0)
    return transformers.Gemma2ForCausalLM(config).eval()


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma2], ids=["llama", "gemma2"])
@pytest.mark.parametrize("max_length,stride", [(32, 32), (32, 12), (200, 16), (16, 1)])
def test_perplexity_equals_the_transformers_recipe(make, max_length, stride):
    model = make()
    input_ids = torch.randint(0, 128, (1, 90), generator=torch.Generator().manual_seed(1))
    expected = recipe_perplexity(model, input_ids, max_length, stride)
    got = pyfastpeft.perplexity(model, input_ids, max_length=max_length, stride=stride)
    assert got == pytest.approx(expected, rel=1e-5)
    assert 1 < got < 10 * 128  # a random model is near uniform over the vocabulary, not degenerate


def test_perplexity_rejects_bad_input():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 20))
    with pytest.raises(ValueError, match=r"stride \(20\) must be <= max_length \(10\)"):
        pyfastpeft.perplexity(model, ids, max_length=10, stride=20)
    with pytest.raises(ValueError, match="input_ids must be"):
        pyfastpeft.perplexity(model, ids[:, :1])
    with pytest.raises(TypeError, match="int64"):
        pyfastpeft.perplexity(model, ids.int())
    with pytest.raises(ValueError, match="not a transformers causal LM"):
        pyfastpeft.perplexity(torch.nn.Linear(2, 2), ids)
