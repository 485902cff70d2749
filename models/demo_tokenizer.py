"""The demo LLM's tokenizer: a deterministic stand-in for a BPE tokenizer.

Words (`\\w+`) and single punctuation characters are tokens; a word longer than four
characters is cut into four-character pieces, which gives about 1.5 tokens per word of
English prose (BPE tokenizers report ~1.3; technical text runs higher in both).
Whitespace is never a token.

The demo model (`ingest/triton/model_repository/demo-llm/1/model.py`) runs inside
Triton's own venv and cannot import this package, so it carries an identical copy of
`tokenize`; tests/unit/test_demo_tokenizer.py checks that the two agree. Change both
together.
"""

from __future__ import annotations

import re

__all__ = ["PIECE_CHARS", "count_tokens", "tokenize"]

#: The longest token a word is cut into, in characters.
PIECE_CHARS = 4

_WORD_OR_MARK = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """The tokens of `text`, in order; concatenated they give `text` without whitespace."""
    tokens: list[str] = []
    for match in _WORD_OR_MARK.finditer(text):
        word = match.group()
        tokens.extend(word[i : i + PIECE_CHARS] for i in range(0, len(word), PIECE_CHARS))
    return tokens


def count_tokens(text: str) -> int:
    """How many tokens the demo model counts for `text` (its `num_input_tokens`)."""
    return len(tokenize(text))
