"""Model folders for use outside plw-train: a .gguf as a plain HF folder; a LoRA adapter merged into its base.

transformers' ``Trainer`` refuses a GGUF-loaded model ("quantized with QuantizationMethod.GGUF"), and
peft needs a base with a config.json: :func:`convert_gguf` writes the dequantised model (weights,
config, tokenizer) as an ordinary folder that both load. :func:`merge_adapter` writes an adapter
folder merged into its base, loadable with ``AutoModelForCausalLM.from_pretrained`` alone.
Folders are written beside the target and renamed into place, so a crash never leaves half a folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .tokenizer import gguf_location, load_tokenizer

DTYPES = ("fp32", "bf16", "fp16")


def dequantised(model: Any) -> Any:
    """``model`` without the GGUF quantizer record that makes transformers refuse to save or train it.

    transformers loads a .gguf as float weights in plain layers (the legacy path) but keeps a quantizer
    that marks the model "not serializable"/"not trainable"; dropping it is all that is left to do.
    Packed GGUF layers (the kernel path) are refused.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return model
    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.lower().startswith("gguf")})
    if packed:
        raise ConfigError(f"the model keeps packed GGUF layers ({', '.join(packed)}): cannot write it as a float model")
    quantizer.remove_quantization_config(model)
    return model


def save_folder(model: Any, tokenizer: Any, out: Path) -> Path:
    """``model`` (+ ``tokenizer`` when not None) into ``out``, atomically (an existing ``out`` is replaced)."""
    out = Path(out)
    model = dequantised(model)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def convert_gguf(gguf: str | Path, out: str | Path, *, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Dequantise ``gguf`` into a plain, trainable Hugging Face folder ``out`` (model, config, tokenizer)."""
    from transformers import AutoModelForCausalLM

    gguf, out = Path(gguf), Path(out)
    if gguf.suffix != ".gguf" or not gguf.is_file():
        raise ConfigError(f"{gguf}: not a .gguf file")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out}: exists and is not empty; use --overwrite")
    where, name = gguf_location(str(gguf))
    try:
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=_torch_dtype(dtype))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{gguf}: cannot load a causal LM: {str(e).splitlines()[0]}") from None
    return save_folder(model, load_tokenizer(str(gguf), fast=False), out)


def merge_adapter(adapter: str | Path, out: str | Path, *, dtype: str = "fp32") -> Path:
    """The LoRA ``adapter`` folder merged into its base (``base_model_name_or_path``), saved as ``out``."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter}: no adapter_config.json (not a LoRA adapter folder)")
    try:
        model = AutoPeftModelForCausalLM.from_pretrained(str(adapter), dtype=_torch_dtype(dtype))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{adapter}: cannot load the adapter and its base: {str(e).splitlines()[0]}") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(adapter))
    except (OSError, ValueError):
        tok = None  # the adapter was saved without a tokenizer
    return save_folder(model.merge_and_unload(), tok, Path(out))
