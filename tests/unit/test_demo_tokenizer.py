"""The demo LLM's tokenizer, and the copy inside the Triton model that must match it."""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.demo_tokenizer import PIECE_CHARS, count_tokens, tokenize

MODEL_FILE = (
    Path(__file__).resolve().parents[2] / "ingest/triton/model_repository/demo-llm/1/model.py"
)

EXAMPLES = [
    "",
    "   \n\t ",
    "Hello, world!",
    "internationalization",
    "GPU-seconds per tenant: 12.5 kWh (p99 = 1.3x).",
    "naïve café, 東京大学です — ok?",
    "snake_case_identifier_with_underscores",
    "Summarise the invoice for tenant acme-corp, line by line.\nThanks!",
    "emoji 🚀🚀 and symbols $€%&",
]


@pytest.fixture(scope="module")
def model_module() -> Iterator[types.ModuleType]:
    """model.py imported outside Triton: its top-level `triton_python_backend_utils`
    import is satisfied by an empty stand-in (the tokenizer and generator never use it)."""
    stand_in = types.ModuleType("triton_python_backend_utils")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "triton_python_backend_utils", stand_in)
        spec = importlib.util.spec_from_file_location("demo_llm_model", MODEL_FILE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    yield module


def test_known_tokenizations() -> None:
    assert tokenize("Hello, world!") == ["Hell", "o", ",", "worl", "d", "!"]
    assert tokenize("internationalization") == ["inte", "rnat", "iona", "liza", "tion"]
    assert tokenize("12.5 kWh") == ["12", ".", "5", "kWh"]
    assert tokenize("") == []
    assert count_tokens("  \n ") == 0


def test_english_prose_is_between_one_and_two_tokens_per_word() -> None:
    # BPE tokenizers give ~1.3 tokens per English word; 4-character pieces give a bit more.
    text = (
        "It was the best of times, it was the worst of times, it was the age of wisdom, "
        "it was the age of foolishness, it was the epoch of belief, it was the epoch of "
        "incredulity, it was the season of Light, it was the season of Darkness."
    )
    ratio = count_tokens(text) / len(text.split())
    assert 1.2 <= ratio <= 1.8, ratio


@pytest.mark.parametrize("text", EXAMPLES)
def test_model_copy_agrees_on_examples(model_module: types.ModuleType, text: str) -> None:
    assert model_module.tokenize(text) == tokenize(text)


def test_model_copy_has_the_same_piece_length(model_module: types.ModuleType) -> None:
    assert model_module.PIECE_CHARS == PIECE_CHARS


@given(text=st.text(max_size=200))
def test_model_copy_agrees_on_any_text(model_module: types.ModuleType, text: str) -> None:
    assert model_module.tokenize(text) == tokenize(text)


@given(st.text(max_size=200))
def test_tokens_cover_the_text_without_whitespace(text: str) -> None:
    tokens = tokenize(text)
    assert "".join(tokens) == re.sub(r"\s", "", text)
    assert all(1 <= len(token) <= PIECE_CHARS for token in tokens)
    assert not any(re.search(r"\s", token) for token in tokens)


@given(st.text(max_size=100), st.text(max_size=100))
def test_counts_add_up_across_whitespace(left: str, right: str) -> None:
    assert count_tokens(f"{left} {right}") == count_tokens(left) + count_tokens(right)


@given(prompt=st.text(max_size=100), max_tokens=st.integers(min_value=1, max_value=300))
def test_generated_text_is_one_token_per_response(
    model_module: types.ModuleType, prompt: str, max_tokens: int
) -> None:
    # The gateway may recount the streamed text; it must match num_output_tokens.
    model = model_module
    text = model.generate_text(prompt, max_tokens)
    assert count_tokens(text) == max_tokens
    assert text == model.generate_text(prompt, max_tokens)  # deterministic
    seed = model.prompt_seed(prompt)
    assert all(count_tokens(model.token_text(seed, i)) == 1 for i in range(max_tokens))
