"""Where the Triton server is installed: its own venv, `.venv-triton`.

nvidia-pytriton 0.7.0 ships a real `tritonserver` 2.51 binary but pins numpy < 2, and
our venv pins numpy 2, so the server lives in a venv of its own made by
`ingest/triton/setup_venv.sh` (`make triton-deps`). Only the server process and its
Python-backend stub run there; our code talks to it with tritonclient from our venv.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from models.errors import ServiceError

#: Overrides where the Triton venv is (read at call time, like the setup script does).
TRITON_VENV_ENV = "GPULEDGER_TRITON_VENV"

_INSTALL_HINT = "run `make triton-deps` (or `bash ingest/triton/setup_venv.sh`) to install it"
_SERVER_SUBDIR = Path("pytriton", "tritonserver")


class TritonNotInstalled(ServiceError):
    """The Triton venv or a file the server needs is missing; says how to install it."""


def triton_venv_dir(root: Path | None = None) -> Path:
    """The Triton venv: `<root>/.venv-triton` when `root` is given, else the directory in
    $GPULEDGER_TRITON_VENV, else `.venv-triton` in the repository holding this package."""
    if root is not None:
        return root / ".venv-triton"
    override = os.environ.get(TRITON_VENV_ENV)
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parents[2] / ".venv-triton"


@dataclass(frozen=True)
class TritonInstall:
    """The paths and environment a `tritonserver` process from one venv needs."""

    venv_dir: Path
    site_packages: Path
    #: LIBDIR of the Python the venv was made with: holds the libpython3.11.so.1.0 the
    #: backend stub must load (a pyenv build) or is the system's library directory.
    python_libdir: Path

    @property
    def server_dir(self) -> Path:
        return self.site_packages / _SERVER_SUBDIR

    @property
    def binary(self) -> Path:
        return self.server_dir / "bin" / "tritonserver"

    @property
    def backends_dir(self) -> Path:
        """The shipped backends; their python/ lacks the stub (see `python_stub`)."""
        return self.server_dir / "backends"

    @property
    def python_stub(self) -> Path:
        """The Python 3.11 backend stub, to be copied into `<backends>/python/`."""
        return self.server_dir / "python_backend_stubs" / "3.11" / "triton_python_backend_stub"

    @property
    def libs_dir(self) -> Path:
        """The wheel's bundled shared libraries (libcudart among them)."""
        return self.site_packages / "nvidia_pytriton.libs"

    def server_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default: our environment) adjusted for the server and its stub.

        The Python LIBDIR comes first on LD_LIBRARY_PATH so the stub loads the libpython
        of the venv's own Python (Debian's 3.11.2 fails with `'_thread.RLock' object has
        no attribute '_recursion_count'` under a pyenv 3.11.7 venv); without the wheel's
        libs the stub cannot load libcudart and the server hangs instead of exiting. The
        venv's bin/ comes first on PATH so the stub's python imports the venv's numpy.
        Our PYTHONPATH/PYTHONHOME must not leak into the stub (numpy 2 would be found).
        """
        env = dict(os.environ if base is None else base)
        for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"):
            env.pop(name, None)
        library_path = [str(self.python_libdir), str(self.libs_dir)]
        if env.get("LD_LIBRARY_PATH"):
            library_path.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(library_path)
        env["PATH"] = os.pathsep.join(
            [str(self.venv_dir / "bin"), *filter(None, [env.get("PATH", "/usr/bin:/bin")])]
        )
        env["VIRTUAL_ENV"] = str(self.venv_dir)
        return env


def triton_install(venv_dir: Path | None = None) -> TritonInstall:
    """The Triton install in `venv_dir` (default `triton_venv_dir()`), checked complete;
    TritonNotInstalled when anything the server needs is missing."""
    return _triton_install(Path(venv_dir or triton_venv_dir()).absolute())


def tritonserver_binary(venv_dir: Path | None = None) -> Path:
    """The `tritonserver` executable in the Triton venv; TritonNotInstalled when absent."""
    return triton_install(venv_dir).binary


@functools.cache
def _triton_install(venv_dir: Path) -> TritonInstall:
    python = venv_dir / "bin" / "python"
    if not python.exists():
        raise TritonNotInstalled(f"Triton server venv {venv_dir} not found; {_INSTALL_HINT}")
    probe = (
        "import json, sysconfig; print(json.dumps({'purelib': sysconfig.get_paths()['purelib'],"
        " 'libdir': sysconfig.get_config_var('LIBDIR')}))"
    )
    try:
        out = subprocess.run(
            [str(python), "-I", "-c", probe], capture_output=True, text=True, check=True, timeout=30
        ).stdout
        paths = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise TritonNotInstalled(
            f"Triton server venv {venv_dir}: its python does not run ({exc}); {_INSTALL_HINT}"
        ) from None
    install = TritonInstall(venv_dir, Path(paths["purelib"]), Path(paths["libdir"]))
    for path in (install.binary, install.backends_dir / "python", install.python_stub):
        if not path.exists():
            raise TritonNotInstalled(
                f"Triton server venv {venv_dir} is incomplete: {path} is missing; {_INSTALL_HINT}"
            )
    return install
