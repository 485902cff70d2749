"""demo-llm: a stand-in LLM served by a real Triton server (Python backend, decoupled).

It streams deterministic text at a realistic pace so that the metering gateway, the
load generator and the tests exercise real Triton streaming, cancellation and metrics
without a GPU. It runs in Triton's venv (.venv-triton), never in ours: it may import
only the standard library, numpy and triton_python_backend_utils.

Contract (the metering gateway relies on it exactly):
- inputs: `prompt` TYPE_STRING [1]; `max_tokens` TYPE_INT32 [1].
- one response per generated token, each with `text_output` TYPE_STRING [1] (the
  token's text, a space and a word of at most four characters, so the generated text
  tokenizes back to exactly that many tokens), `num_input_tokens` TYPE_INT32 [1] (the
  prompt's token count, the same in every response) and `num_output_tokens`
  TYPE_INT32 [1] (1, the tokens in this response); then an empty response carrying
  only the FINAL flag.
- errors: one response carrying only the error, then the empty FINAL response (sent
  separately, so a client asking for empty final responses learns which request ended;
  tritonclient drops the request id of an error response).
- `max_tokens` <= 0: the error "max_tokens must be >= 1", no tokens.
- cancellation (the client cancels the stream or the request) is checked before every
  token: generation stops, an error response with code CANCELLED and FINAL are sent,
  and the server log gets "demo-llm: request <id> cancelled after K of N tokens".
- pace: `prefill_s_per_token` x prompt tokens before generation starts, then
  `decode_s_per_token` per token (first token included), from the model config's
  `parameters` (string values); tokens are paced against a deadline, so send overhead
  does not accumulate.

Demo/test hook, not an API: the request parameter `fail_after_tokens` = K (an integer
>= 0, a Triton request parameter, e.g. `parameters={"fail_after_tokens": 3}` in
tritonclient) makes the model send N = min(K, max_tokens) tokens, then an error response
"injected failure after N tokens", then FINAL. It lets tests and the load generator
produce failed streams that already delivered tokens.

Each request generates in a thread of its own: execute() starts the threads and
returns at once, so concurrent streams interleave instead of running one after another.

If the server dies without unloading the model (SIGKILL: Triton 2.51 cannot shut
down while a client holds a gRPC stream open, so its launcher kills it), this stub
would stay behind, deadlocked, with its /dev/shm region; a watchdog thread notices the
server is gone (the stub is reparented), removes the region and exits the stub.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

# --- The tokenizer: an identical copy of models/demo_tokenizer.py (the model cannot
# import our package). tests/unit/test_demo_tokenizer.py checks the two agree.
PIECE_CHARS = 4

_WORD_OR_MARK = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """The tokens of `text`, in order; concatenated they give `text` without whitespace."""
    tokens: list[str] = []
    for match in _WORD_OR_MARK.finditer(text):
        word = match.group()
        tokens.extend(word[i : i + PIECE_CHARS] for i in range(0, len(word), PIECE_CHARS))
    return tokens


# --- Generation: deterministic text, a word list walked from a seed taken from the prompt.
# Every word has at most PIECE_CHARS characters, so each is exactly one token.
_WORDS = (
    "the", "GPU", "runs", "each", "fast", "tile", "of", "work", "and", "bill",
    "a", "fair", "cost", "to", "all", "who", "use", "it", "now", "then",
    "data", "flow", "from", "node", "into", "heap", "with", "low", "heat", "load",
)  # fmt: skip
_STRIDE = 7  # coprime with len(_WORDS): the walk visits every word before repeating


def prompt_seed(prompt: str) -> int:
    """A seed that depends only on the prompt (crc32: stable across processes)."""
    return zlib.crc32(prompt.encode("utf-8"))


def token_text(seed: int, index: int) -> str:
    """The text of generated token `index` (0-based) for a prompt with `seed`."""
    return " " + _WORDS[(seed + index * _STRIDE) % len(_WORDS)]


def generate_text(prompt: str, max_tokens: int) -> str:
    """The whole text the model streams for `prompt` (for tests)."""
    seed = prompt_seed(prompt)
    return "".join(token_text(seed, i) for i in range(max_tokens))


class RequestError(ValueError):
    """A bad request: answered with an error response, never raised out of the model."""


def _pace_parameter(config: dict[str, Any], key: str) -> float:
    raw = config.get("parameters", {}).get(key, {}).get("string_value")
    if raw is None:
        raise pb_utils.TritonModelException(f"demo-llm config: parameter {key} is missing")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise pb_utils.TritonModelException(
            f"demo-llm config: parameter {key} must be a number of seconds >= 0, got {raw!r}"
        )
    return value


def _input_scalar(request: Any, name: str) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise RequestError(f"input {name} is missing")
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise RequestError(f"input {name} must hold exactly one value, got {values.size}")
    return values[0]


def _prompt(request: Any) -> str:
    value = _input_scalar(request, "prompt")
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _fail_after_tokens(request: Any) -> int | None:
    """The `fail_after_tokens` request parameter (the test hook), None when absent."""
    parameters = json.loads(request.parameters() or "{}")
    raw = parameters.get("fail_after_tokens")
    if raw is None:
        return None
    if isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise RequestError(f"fail_after_tokens must be an integer >= 0, got {raw!r}")
    return raw


def _remove_own_shm_region() -> None:
    """Unlink the /dev/shm region this stub was started with (named in its argv)."""
    try:
        argv = Path("/proc/self/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return
    for arg in argv:
        if arg.startswith("triton_python_backend_shm_region_") and "/" not in arg:
            with contextlib.suppress(OSError):
                (Path("/dev/shm") / arg).unlink()


def _token_response(text: str, num_input_tokens: int) -> Any:
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("num_input_tokens", np.array([num_input_tokens], dtype=np.int32)),
            pb_utils.Tensor("num_output_tokens", np.array([1], dtype=np.int32)),
        ]
    )


class TritonPythonModel:
    """Triton's entry points: initialize, execute, finalize."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(
                "demo-llm must be decoupled: set model_transaction_policy { decoupled: true }"
            )
        self._prefill_s_per_token = _pace_parameter(config, "prefill_s_per_token")
        self._decode_s_per_token = _pace_parameter(config, "decode_s_per_token")
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._start_watchdog()
        pb_utils.Logger.log_info(
            f"demo-llm: ready, prefill {self._prefill_s_per_token:g} s/token, "
            f"decode {self._decode_s_per_token:g} s/token"
        )

    def execute(self, requests: list[Any]) -> None:
        # Decoupled: answer through each request's response sender, from its own thread.
        for request in requests:
            thread = threading.Thread(target=self._serve, args=(request,), daemon=True)
            with self._lock:
                self._threads.add(thread)
            thread.start()
        return None

    def finalize(self) -> None:
        self._stopping.set()
        deadline = time.monotonic() + 2.0
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _start_watchdog(self) -> None:
        server_pid = os.getppid()
        thread = threading.Thread(target=self._watch, args=(server_pid,), name="demo-llm-watchdog")
        thread.daemon = True
        thread.start()

    def _watch(self, server_pid: int) -> None:
        # Ends with finalize(); reparenting means the server died without unloading us.
        while not self._stopping.wait(0.5):
            if os.getppid() != server_pid:
                _remove_own_shm_region()
                os._exit(1)

    def _serve(self, request: Any) -> None:
        sender = request.get_response_sender()
        try:
            error = self._generate(request, sender)
        except RequestError as exc:
            error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
        except Exception as exc:  # a bug here must still end the stream
            pb_utils.Logger.log_error(f"demo-llm: request {request.request_id()!r} failed: {exc!r}")
            error = pb_utils.TritonError(f"demo-llm internal error: {exc}")
        try:
            # The error and FINAL go separately: tritonclient hands a stream's error to
            # the callback without the request id, while the empty final response
            # carries it (with enable_empty_final_response), so clients know which
            # request ended.
            if error is not None:
                sender.send(pb_utils.InferenceResponse(error=error))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:  # the client is gone; nothing left to tell it
            pb_utils.Logger.log_warn(
                f"demo-llm: request {request.request_id()!r}: final response not sent: {exc!r}"
            )
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _generate(self, request: Any, sender: Any) -> Any:
        """Stream the tokens; returns the TritonError to end with, None on success."""
        prompt = _prompt(request)
        max_tokens = int(_input_scalar(request, "max_tokens"))
        if max_tokens < 1:
            raise RequestError("max_tokens must be >= 1")
        fail_after = _fail_after_tokens(request)
        num_input_tokens = len(tokenize(prompt))
        seed = prompt_seed(prompt)

        due = time.monotonic() + self._prefill_s_per_token * num_input_tokens
        for index in range(max_tokens):
            if fail_after is not None and index >= fail_after:
                return self._injected_failure(request, fail_after)
            due += self._decode_s_per_token
            if self._stopping.wait(max(0.0, due - time.monotonic())):
                return pb_utils.TritonError(
                    "demo-llm is shutting down", pb_utils.TritonError.UNAVAILABLE
                )
            if request.is_cancelled():
                pb_utils.Logger.log_info(
                    f"demo-llm: request {request.request_id()!r} cancelled after "
                    f"{index} of {max_tokens} tokens"
                )
                return pb_utils.TritonError("request cancelled", pb_utils.TritonError.CANCELLED)
            sender.send(_token_response(token_text(seed, index), num_input_tokens))
        if fail_after is not None:  # fail_after >= max_tokens: fail after the last token
            return self._injected_failure(request, max_tokens)
        return None

    @staticmethod
    def _injected_failure(request: Any, tokens_sent: int) -> Any:
        message = f"injected failure after {tokens_sent} tokens"
        pb_utils.Logger.log_info(f"demo-llm: request {request.request_id()!r}: {message}")
        return pb_utils.TritonError(message)
