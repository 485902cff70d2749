"""A real Triton Inference Server on this machine, serving the demo LLM.

The server is the `tritonserver` 2.51 binary from PyPI's nvidia-pytriton 0.7.0,
installed in its own venv (`.venv-triton`, `make triton-deps`) because it pins
numpy < 2. It runs on the CPU with the Python backend; the model `demo-llm` is a
decoupled (streaming) stand-in LLM whose contract is in its model.py. Clients use
tritonclient from our venv.

- `TritonServer(work_dir, ...)`: start/stop the server as a child process (a context
  manager), with `grpc_url`, `http_url`, `metrics_url`, `pid`, `log_path`.
- `triton_venv_dir()`, `tritonserver_binary()`, `triton_install()`: where it is
  installed; `TritonNotInstalled` says how to install it.
"""

from ingest.triton.server import (
    DEMO_MODEL,
    DEMO_MODEL_VERSION,
    MODEL_REPOSITORY,
    TritonServer,
    write_model_repository,
)
from ingest.triton.venv import (
    TritonInstall,
    TritonNotInstalled,
    triton_install,
    triton_venv_dir,
    tritonserver_binary,
)

__all__ = [
    "DEMO_MODEL",
    "DEMO_MODEL_VERSION",
    "MODEL_REPOSITORY",
    "TritonInstall",
    "TritonNotInstalled",
    "TritonServer",
    "triton_install",
    "triton_venv_dir",
    "tritonserver_binary",
    "write_model_repository",
]
