"""The model side of a run: load (folder, .gguf, hub), LoRA, and the module DeepSpeed wraps.

Models are called as ``decoder(input_ids=..., position_ids=..., use_cache=False)`` without an
attention mask (packed examples stay isolated, see :mod:`plw_data.batch.collate`), and the loss runs
on the final hidden states with the lm_head weight (:mod:`plw_data.batch.loss`), never full logits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..tokenizer import gguf_location
from .config import TrainConfig


def allocator_env() -> None:
    """Large CPU tensors on transparent huge pages (PyTorch's ``THP_MEM_ALLOC_ENABLE``), unless the
    environment already says. PyTorch reads it at its first allocation, so ``plw-train`` calls this
    before importing torch. Measured on the bench_hf setup (SmolLM2 LoRA, CPU, 4 paired runs): peak
    RSS 2.33-2.37 GB instead of 2.54-2.58, time per update the same within the runs' spread."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def resolve_dtype(name: str) -> str:
    """``auto``: bf16 where the hardware computes it natively; else fp32 (CPUs without AVX512-BF16/AMX
    run bf16 matmuls through slow fallback kernels, ~35x slower than fp32 on an AVX2 EPYC)."""
    if name != "auto":
        return name
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return "bf16" if native else "fp32"


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[name]


def load_model(cfg: TrainConfig, base_dir: Path | None = None):
    """A causal LM from a local folder, a .gguf file (dequantised) or a hub name, with LoRA unless --no-lora.

    ``base_dir``: for a .gguf model with LoRA, rank 0 writes the dequantised base there once (a plain
    HF folder, :func:`plw_data.export.save_folder`) and the adapter records it as its base, so
    ``AutoPeftModelForCausalLM`` can load the adapter (the .gguf's folder has no config.json).
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(cfg.dtype)}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    where, gguf = gguf_location(cfg.model)
    if gguf:
        if not Path(cfg.model).is_file():
            raise ConfigError(f"--model {cfg.model}: GGUF file not found")
        kwargs.update(gguf_file=gguf)
    elif not Path(where).exists() and (cfg.model.startswith((".", "/")) or os.environ.get("HF_HUB_OFFLINE") == "1"):
        raise ConfigError(f"--model {cfg.model}: no such model folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {cfg.model}: cannot load a causal LM: {str(e).splitlines()[0]}") from None
    check_plain_logits(model.config)
    if gguf:
        from ..export import dequantised

        model = dequantised(model)  # float weights already; drop the record that blocks saving and training
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not cfg.lora:
        return model
    from peft import LoraConfig, get_peft_model

    base_name = None
    if gguf and base_dir is not None:
        base_name = str(Path(base_dir).resolve())
        if int(os.environ.get("RANK", "0")) == 0 and not (Path(base_dir) / "config.json").is_file():
            from ..export import save_folder
            from ..tokenizer import load_tokenizer

            save_folder(model, load_tokenizer(cfg.model, fast=False), Path(base_dir))

    targets = list(cfg.lora_target_modules) or "all-linear"
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if base_name is not None:
        model.peft_config["default"].base_model_name_or_path = base_name
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def check_plain_logits(config) -> None:
    """The fused loss computes hidden @ W.T (+ b); models that soft-cap or scale logits are refused."""
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise ConfigError(f"--model: {config.model_type} transforms its logits ({attr}={value}); not supported")


def decoder_and_head(model):
    """(decoder returning final hidden states, lm_head) of a causal LM, through a peft wrapper if any."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if decoder is None or head is None or decoder is base:
        raise ConfigError(f"--model: cannot find the decoder and lm_head of {type(base).__name__}")
    return decoder, head


def loss_module(model, chunk_size: int | None):
    """nn.Module handed to DeepSpeed: its forward runs the decoder and the fused loss (or eval CE)."""
    import torch

    from ..batch.loss import token_ce_and_argmax, weighted_ce_sum

    class PLWLossModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, position_ids, labels, loss_weights=None, **attn_kwargs):
            decoder, head = decoder_and_head(self.model)
            out = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False, **attn_kwargs)
            hidden, w, b = out.last_hidden_state, head.weight, head.bias
            # Under ZeRO-3 the lm_head weight is an external parameter of this module (registered
            # after deepspeed.initialize), so DeepSpeed gathers it for this forward.
            if loss_weights is None:
                return token_ce_and_argmax(hidden, w, labels, chunk_size=chunk_size, lm_head_bias=b)
            return weighted_ce_sum(hidden, w, labels, loss_weights, chunk_size=chunk_size, lm_head_bias=b)

    return PLWLossModel()


def build_optimizer(module, cfg: TrainConfig):
    """torch AdamW: no JIT-compiled DeepSpeed op (FusedAdam/CPUAdam), the same code on CPU and GPU."""
    import torch

    trainable = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]  # matrices; biases and norm scales are not decayed
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def build_engine(module, model, cfg: TrainConfig, ds_config: dict[str, Any], total_steps: int):
    """The DeepSpeed engine around ``module`` (decoder + loss of ``model``): torch AdamW and a LambdaLR
    over :func:`plw_data.train.ds_config.lr_multiplier`, unless the DeepSpeed JSON brings its own."""
    import deepspeed
    import torch

    from .ds_config import lr_multiplier

    optimizer = None if "optimizer" in ds_config else build_optimizer(module, cfg)
    scheduler = None
    if "scheduler" not in ds_config and optimizer is not None:
        warmup, kind, floor = cfg.warmup_for(total_steps), cfg.lr_scheduler, cfg.min_lr_ratio
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda k: lr_multiplier(k, total_steps=total_steps, warmup_steps=warmup, kind=kind, min_ratio=floor)
        )
    params = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        model_parameters=params if optimizer is None else None,
        config=ds_config,
    )
    if engine.zero_optimization_stage() == 0 and torch.distributed.get_world_size() == 1:
        # Alone, ZeRO 0 would still flatten every gradient into one buffer, "all-reduce" it over one
        # rank and copy it back at each update: a transient copy of all trainable gradients, for nothing.
        engine.enable_backward_allreduce = False
    if engine.zero_optimization_stage() == 3:
        # The loss reads the lm_head weight outside the head's forward: make ZeRO-3 gather it
        # for the whole wrapper (the fused loss needs no weight in backward).
        _, head = decoder_and_head(model)
        for p in (head.weight, head.bias):
            if p is not None:
                deepspeed.zero.register_external_parameter(engine.module, p)
    return engine
