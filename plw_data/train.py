"""The PLW trainer: one DeepSpeed code path on CPU and GPU, one process or many.

The loss of an update is Σ w·CE / Σ w over the whole accumulation window and all ranks, so an
update is the same whatever the micro-batch size, accumulation steps and world size (up to float
rounding). How: an update first collates all of its micro-batches, sums their target weights
(``loss_weights`` where ``labels != -100``, shifted as the loss shifts) and all-reduces that sum to
W. Micro-batch i then back-propagates ``weighted_ce_sum_i * world_size / W`` with
``engine.backward(..., scale_wrt_gas=False)``: DeepSpeed *averages* gradients over ranks (the
``world_size`` factor undoes it) and would divide by the accumulation steps (``scale_wrt_gas=False``
stops it), so the summed gradient is exactly that of Σ w·CE / W over one big batch. The logged
``train_loss`` is that exact window value, all-reduced.

Data order: epoch e visits DATA/train in a permutation seeded by (seed, e); update k of an epoch
takes rows [k·G, (k+1)·G) of it, G = micro · accum · world (the last update of an epoch may be
short). Slot j = micro_step · world + rank of the window holds rows [j·micro, (j+1)·micro); an empty
slot runs a zero-weight copy of a row, so every rank runs the same number of passes. Dropout is
re-seeded from (seed, update, rank) before every update. The position in the data is therefore a
function of the update index alone, and ``--resume`` (optimizer, LR scheduler and that index from
OUT/last) continues exactly as if never stopped.

Models are called as ``decoder(input_ids=..., position_ids=..., use_cache=False)`` without an
attention mask (packed examples stay isolated, see :mod:`plw_data.collate`), and the loss runs on
the final hidden states with the lm_head weight (:mod:`plw_data.loss`), never full logits. The
module DeepSpeed wraps is decoder + loss; under ZeRO-3 the lm_head weight is registered as an
external parameter of it, so it is gathered for the loss (the fused loss needs no weight in backward).

A non-finite window loss stops the run before that update is applied (TrainingError naming the step).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoint as ckpt
from .ds_config import build_ds_config, load_ds_config, lr_multiplier
from .errors import ConfigError, PLWError
from .metrics_plot import plot_metrics, read_events
from .schedule import Schedule, parse_schedule
from .train_config import TrainConfig

Event = dict[str, Any]


class TrainingError(PLWError):
    """Training cannot go on (e.g. a non-finite loss)."""


# --------------------------------------------------------------------------- data order (pure)


def epoch_permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of ``epoch``: a permutation seeded by (seed, epoch), the same on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def rank_slots(window: np.ndarray, *, micro: int, accum: int, world: int, rank: int) -> list[np.ndarray]:
    """This rank's row indices for each micro-step of an update (possibly empty at an epoch's end)."""
    return [window[(m * world + rank) * micro : (m * world + rank + 1) * micro] for m in range(accum)]


def steps_per_epoch(n_rows: int, global_batch: int) -> int:
    return max(1, math.ceil(n_rows / global_batch))


def update_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


# --------------------------------------------------------------------------- distributed setup


def default_dist_env() -> None:
    """Make a plain ``plw-train`` a world of one (deepspeed/torchrun set these themselves)."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_distributed() -> tuple[int, int]:
    """(rank, world size) after initialising DeepSpeed comm: gloo on CPU, the accelerator's backend else."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        # The shared-memory comm op is JIT-compiled for 50-110 s at init; gloo needs no extension.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    else:
        accel.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _all_reduce_sum(tensor):
    import torch.distributed as dist

    if dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _barrier() -> None:
    import torch.distributed as dist

    if dist.get_world_size() > 1:
        dist.barrier()


# --------------------------------------------------------------------------- model


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


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[name]


def load_model(cfg: TrainConfig):
    """A causal LM from a local folder, a .gguf file (dequantised) or a hub name, with LoRA unless --no-lora."""
    from transformers import AutoModelForCausalLM

    path = Path(cfg.model)
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(cfg.dtype)}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"--model {path}: GGUF file not found")
        kwargs.update(gguf_file=path.name)
        path = path.parent
    elif not path.exists() and (cfg.model.startswith((".", "/")) or os.environ.get("HF_HUB_OFFLINE") == "1"):
        raise ConfigError(f"--model {cfg.model}: no such model folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {cfg.model}: cannot load a causal LM: {str(e).splitlines()[0]}") from None
    _check_plain_logits(model.config)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not cfg.lora:
        return model
    from peft import LoraConfig, get_peft_model

    targets = list(cfg.lora_target_modules) or "all-linear"
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def _check_plain_logits(config) -> None:
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


def _loss_module(model, chunk_size: int | None):
    """nn.Module handed to DeepSpeed: its forward runs the decoder and the fused loss (or eval CE)."""
    import torch

    from .loss import token_ce_and_argmax, weighted_ce_sum

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


def _optimizer(module, cfg: TrainConfig):
    """torch AdamW: no JIT-compiled DeepSpeed op (FusedAdam/CPUAdam), the same code on CPU and GPU."""
    import torch

    trainable = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]  # matrices; biases and norm scales are not decayed
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


# --------------------------------------------------------------------------- data


def _load_split(path: Path, what: str):
    from datasets import load_from_disk

    if not path.is_dir():
        raise ConfigError(f"{path}: {what} split not found (expected a folder from plw-data prepare)")
    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a foreign folder
        raise ConfigError(f"{path}: cannot load the {what} split: {e}") from None
    missing = {"input_ids", "prompt_mask", "completion_mask", "template_mask", "seq_lengths", "example_index"} - set(
        ds.column_names
    )
    if missing:
        raise ConfigError(f"{path}: the {what} split lacks field(s) {', '.join(sorted(missing))}")
    if len(ds) == 0:
        raise ConfigError(f"{path}: the {what} split is empty")
    return ds


def _eval_path(cfg: TrainConfig) -> Path | None:
    if cfg.eval_data:
        return Path(cfg.eval_data)
    default = Path(cfg.data) / "eval"
    return default if default.is_dir() else None


def _collate_rows(collate, dataset, indices: np.ndarray, fallback: int):
    """Collate ``indices`` of ``dataset``; an empty slot becomes one row with every target removed."""
    if len(indices):
        return collate(dataset[[int(i) for i in indices]])
    batch = collate(dataset[[fallback]])
    batch["labels"].fill_(-100)
    batch["loss_weights"].zero_()
    return batch


def _target_weight(batch) -> float:
    w = batch["loss_weights"][:, 1:].double() * (batch["labels"][:, 1:] != -100)
    return float(w.sum())


def _model_kwargs(batch, device, *, with_weights: bool) -> dict[str, Any]:
    keys = ["input_ids", "position_ids", "labels", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"]
    if with_weights:
        keys.append("loss_weights")
    return {k: batch[k].to(device) if hasattr(batch[k], "to") else batch[k] for k in keys if k in batch}


# --------------------------------------------------------------------------- special tokens


def closing_token_ids(cfg: TrainConfig, model_config) -> list[int]:
    """Ids of special tokens that may close a completion (left out of answer accuracy)."""
    ids: set[int] = set()
    for src in (model_config, getattr(model_config, "generation_config", None)):
        eos = getattr(src, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    tok = load_tokenizer(cfg)
    if tok is not None:
        ids.update(int(i) for i in tok.all_special_ids)
        if tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
    return sorted(ids)


def _split_gguf(path: str) -> tuple[str, str | None]:
    """(folder or name, GGUF file name or None): transformers loads a .gguf as folder + gguf_file."""
    p = Path(path)
    return (str(p.parent), p.name) if p.suffix == ".gguf" else (path, None)


def _tokenizer_source(cfg: TrainConfig) -> tuple[str, str | None]:
    """--tokenizer, else the prepared data's tokenizer (manifest) when local, else the model's."""
    if cfg.tokenizer:
        return _split_gguf(cfg.tokenizer)
    try:
        name = json.loads((Path(cfg.data) / "manifest.json").read_text(encoding="utf-8"))["tokenizer"]["name_or_path"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        name = None
    if isinstance(name, str) and Path(name).exists():
        return _split_gguf(name)
    return _split_gguf(cfg.model)


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(path: str, gguf: str | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))


def load_tokenizer(cfg: TrainConfig):
    """The run's tokenizer (see ``--tokenizer``), or None when none loads."""
    try:
        return _cached_tokenizer(*_tokenizer_source(cfg))
    except (OSError, ValueError, TypeError):
        if cfg.tokenizer:
            raise ConfigError(f"--tokenizer {cfg.tokenizer}: cannot load a tokenizer") from None
        return None


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class RunState:
    """What a checkpoint must carry besides DeepSpeed's state (the data position is ``step``)."""

    step: int = 0
    eval_step: int | None = None  # the step of the last eval
    best_value: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False


class Trainer:
    """One training run; :func:`train` is the entry point."""

    def __init__(self, cfg: TrainConfig, on_event: Callable[[Event], None] | None = None) -> None:
        import torch

        default_dist_env()
        cfg = dataclasses.replace(cfg, dtype=resolve_dtype(cfg.dtype))
        self.cfg = cfg
        self.on_event = on_event
        self.out = Path(cfg.output)
        self.rank, self.world = _init_distributed()
        self.is_main = self.rank == 0
        self._check_output()
        self.train_ds = _load_split(Path(cfg.data) / "train", "train")
        eval_path = _eval_path(cfg)
        self.eval_ds = _load_split(eval_path, "eval") if eval_path else None
        if self.eval_ds is not None and cfg.max_eval_rows:
            self.eval_ds = self.eval_ds.select(range(min(cfg.max_eval_rows, len(self.eval_ds))))

        ds_config = (
            load_ds_config(cfg.deepspeed, cfg, world_size=self.world)
            if cfg.deepspeed
            else build_ds_config(cfg, world_size=self.world)
        )
        if ds_config.get("fp16", {}).get("enabled") and not torch.cuda.is_available():
            raise ConfigError("--dtype fp16 needs a GPU; use bf16 or fp32 on CPU")
        self.micro = int(ds_config["train_micro_batch_size_per_gpu"])
        self.accum = int(ds_config["gradient_accumulation_steps"])
        self.global_batch = self.micro * self.accum * self.world
        self.steps_per_epoch = steps_per_epoch(len(self.train_ds), self.global_batch)
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.num_epochs * self.steps_per_epoch
        self.plw: Schedule = parse_schedule(cfg.prompt_loss_weight)
        self.template: Schedule | None = (
            parse_schedule(cfg.template_weight, name="template_weight") if cfg.template_weight is not None else None
        )

        torch.manual_seed(cfg.seed)  # LoRA initialisation
        model = load_model(cfg)
        self.model = model
        self.closing_ids = torch.tensor(closing_token_ids(cfg, model.config), dtype=torch.long)
        pad = getattr(model.config, "pad_token_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) else 0
        self.flash = "flash" in str(getattr(model.config, "_attn_implementation", ""))
        self.ds_config = ds_config
        self.engine = self._engine(_loss_module(model, cfg.loss_chunk_size), ds_config)
        self.state = RunState()
        self.saved_step: int | None = None
        self.events: list[Event] = []
        self.table = None
        self.t0 = time.time()

    # ----------------------------------------------------------------- setup helpers

    def _check_output(self) -> None:
        busy = (self.out / "metrics.jsonl").exists() or (self.out / "last").exists()
        if busy and not (self.cfg.resume or self.cfg.overwrite):
            raise ConfigError(f"{self.out}: holds a run already; --resume continues it, --overwrite starts over")
        # On resume, fail fast (before loading the model) on a missing, partial or corrupt checkpoint.
        self.saved = ckpt.verify(ckpt.resolve(self.out / "last")) if self.cfg.resume else {}
        _barrier()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.cfg.overwrite:
                for name in ("metrics.jsonl", "metrics.png"):
                    (self.out / name).unlink(missing_ok=True)
                for name in ("best", "last"):
                    shutil.rmtree(self.out / name, ignore_errors=True)
        _barrier()

    def _engine(self, module, ds_config: dict[str, Any]):
        import deepspeed
        import torch

        optimizer = None if "optimizer" in ds_config else _optimizer(module, self.cfg)
        scheduler = None
        if "scheduler" not in ds_config and optimizer is not None:
            warmup = self.cfg.warmup_for(self.total_steps)
            total, kind, floor = self.total_steps, self.cfg.lr_scheduler, self.cfg.min_lr_ratio
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                lambda k: lr_multiplier(k, total_steps=total, warmup_steps=warmup, kind=kind, min_ratio=floor),
            )
        params = [p for p in module.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            model_parameters=params if optimizer is None else None,
            config=ds_config,
        )
        if engine.zero_optimization_stage() == 3:
            # The loss reads the lm_head weight outside the head's forward: make ZeRO-3 gather it
            # for the whole wrapper (the fused loss needs no weight in backward).
            _, head = decoder_and_head(self.model)
            for p in (head.weight, head.bias):
                if p is not None:
                    deepspeed.zero.register_external_parameter(engine.module, p)
        return engine

    # ----------------------------------------------------------------- events

    def emit(self, event: Event) -> None:
        self.events.append(event)
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(event) + "\n")
            if self.table is not None:
                self.table.update(event)
        if self.on_event is not None:
            self.on_event(event)

    def _plot(self) -> None:
        if self.is_main:
            plot_metrics(read_events(self.out / "metrics.jsonl"), self.out / "metrics.png", title=str(self.out.name))

    # ----------------------------------------------------------------- main loop

    def run(self) -> list[Event]:
        from .metrics_plot import LiveTable

        if self.cfg.resume:
            self._resume()
        self.table = LiveTable(enabled=self.cfg.progress) if self.is_main else None
        if self.table is not None:
            self.table.note(self._summary())
        try:
            if self.total_steps == 0:
                self.evaluate_and_log(require=True)
                self._plot()
                return self.events
            save_every = self.cfg.save_steps or self.cfg.eval_steps
            while self.state.step < self.total_steps and not self.state.stopped_early:
                self.emit(self.train_step())
                step = self.state.step
                if self.cfg.eval_steps and step % self.cfg.eval_steps == 0:
                    self.evaluate_and_log()
                if (save_every and step % save_every == 0) or self.state.stopped_early:
                    self.save_last()
            if self.state.eval_step != self.state.step:
                self.evaluate_and_log()
            if self.saved_step != self.state.step:
                self.save_last()
            if self.eval_ds is None:
                self._save_model(self.out / "best", {"metric": None})
            self._plot()
        finally:
            if self.table is not None:
                self.table.close()
        return self.events

    def _summary(self) -> str:
        n_all = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        template = self.cfg.template_weight if self.cfg.template_weight is not None else "= PLW"
        return (
            f"plw-train: {self.cfg.model} ({n_train:,} of {n_all:,} parameters trained, {self.cfg.dtype}, "
            f"ZeRO {self.engine.zero_optimization_stage()}); {self.world} rank(s) x {self.accum} x {self.micro} rows "
            f"per update; {self.total_steps} updates ({self.steps_per_epoch} per epoch); "
            f"PLW {self.plw}, template {template}"
        )

    def _collator(self, step: int, *, eval_mode: bool = False):
        from .collate import PLWCollator

        if eval_mode:
            pw, tw, cw = 1.0, 1.0, 1.0
        else:
            pw = self.plw.value(step, self.total_steps, self.steps_per_epoch)
            tw = None if self.template is None else self.template.value(step, self.total_steps, self.steps_per_epoch)
            cw = self.cfg.completion_weight
        return PLWCollator(
            prompt_loss_weight=pw,
            template_weight=tw,
            completion_weight=cw,
            pad_to_multiple_of=self.cfg.pad_to_multiple_of,
            pad_token_id=self.pad_id,
            emit_cu_seqlens=self.flash,
            return_example_ids=eval_mode,
        )

    def train_step(self) -> Event:
        """One update: collate the window, all-reduce Σw, then forward/backward each micro-batch."""
        import torch

        step = self.state.step
        epoch, offset = divmod(step, self.steps_per_epoch)
        order = epoch_permutation(len(self.train_ds), self.cfg.seed, epoch)
        window = order[offset * self.global_batch : (offset + 1) * self.global_batch]
        collate = self._collator(step)
        slots = rank_slots(window, micro=self.micro, accum=self.accum, world=self.world, rank=self.rank)
        batches = [_collate_rows(collate, self.train_ds, rows, int(window[0])) for rows in slots]
        device = self.engine.device
        local_w = torch.tensor(sum(_target_weight(b) for b in batches), dtype=torch.float64, device=device)
        total_w = _all_reduce_sum(local_w)
        denom = float(total_w) if float(total_w) > 0 else 1.0  # a window without targets: loss 0, no gradient

        torch.manual_seed(update_seed(self.cfg.seed, step, self.rank))
        self.engine.train()
        local = torch.zeros((), dtype=torch.float64, device=device)
        lr = self.engine.get_lr()[0]
        for i, batch in enumerate(batches):
            ce_sum = self.engine(**_model_kwargs(batch, device, with_weights=True))
            local += ce_sum.detach().double()
            if i == len(batches) - 1:
                train_loss = float(_all_reduce_sum(local.clone())) / denom
                if not math.isfinite(train_loss):
                    raise TrainingError(
                        f"non-finite train loss ({train_loss}) at step {step + 1}; stopped before applying that update"
                    )
            self.engine.backward(ce_sum * (self.world / denom), scale_wrt_gas=False)
            self.engine.step()
        self.state.step = step + 1
        event: Event = {
            "step": self.state.step,
            "epoch": round(self.state.step / self.steps_per_epoch, 6),
            "train_loss": train_loss,
            "lr": float(lr),
            "prompt_loss_weight": collate.prompt_loss_weight,
            "template_weight": collate.template_weight,
            "target_weight": float(total_w),
        }
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            event["grad_norm"] = float(norm)
        event["elapsed_s"] = round(time.time() - self.t0, 3)
        return event

    # ----------------------------------------------------------------- eval

    def evaluate(self) -> dict[str, Any]:
        import torch

        from .evaluate import N_SUMS, eval_sums, metrics_from_sums

        assert self.eval_ds is not None
        bs = self.cfg.eval_batch_size or self.micro
        mine = np.arange(self.rank, len(self.eval_ds), self.world)
        n_batches = math.ceil(math.ceil(len(self.eval_ds) / self.world) / bs)
        collate = self._collator(0, eval_mode=True)
        device = self.engine.device
        sums = torch.zeros(N_SUMS, dtype=torch.float64, device=device)
        self.engine.eval()
        with torch.no_grad():
            for b in range(n_batches):
                batch = _collate_rows(collate, self.eval_ds, mine[b * bs : (b + 1) * bs], 0)
                ce, correct = self.engine(**_model_kwargs(batch, device, with_weights=False))
                on = [batch[k].to(device) for k in ("labels", "category", "example_id", "input_ids")]
                sums += eval_sums(ce, correct, *on, self.closing_ids)
        self.engine.train()
        return metrics_from_sums(_all_reduce_sum(sums))

    def evaluate_and_log(self, *, require: bool = False) -> bool:
        """Evaluate, log, keep OUT/best up to date and count early-stopping patience; False without eval data."""
        if self.eval_ds is None:
            if require:
                where = Path(self.cfg.data) / "eval"
                raise ConfigError(f"--max-steps 0 evaluates, but there is no eval split ({where} or --eval-data)")
            return False
        metrics = self.evaluate()
        event = {"step": self.state.step, "epoch": round(self.state.step / self.steps_per_epoch, 6), **metrics}
        self.state.eval_step = self.state.step
        self.emit(event)
        if self.total_steps == 0:
            return True
        value = metrics.get(self.cfg.best_metric)
        if value is not None and self._improves(value):
            self.state.best_value, self.state.best_step, self.state.bad_evals = value, self.state.step, 0
            self._save_model(self.out / "best", {"metric": self.cfg.best_metric, "value": value})
        else:
            self.state.bad_evals += 1
            patience = self.cfg.early_stopping_patience
            if patience and self.state.bad_evals >= patience:
                self.state.stopped_early = True
        self._plot()
        return True

    def _improves(self, value: float) -> bool:
        best = self.state.best_value
        if best is None:
            return True
        return value > best if self.cfg.higher_is_better else value < best

    # ----------------------------------------------------------------- checkpoints

    def _trainer_state(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self.state),
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "global_batch": self.global_batch,
            "train_rows": len(self.train_ds),
            "world_size": self.world,
            "config": dataclasses.asdict(self.cfg),
        }

    def _save_model(self, final: Path, extra: dict[str, Any], *, with_engine_state: bool = False) -> None:
        """Adapter (LoRA) or full model (+ tokenizer) into ``final``, atomically; all ranks call this."""
        import deepspeed

        tmp = ckpt.temp_dir(final) if self.is_main else final.with_name(f".{final.name}.tmp")
        _barrier()
        if with_engine_state:
            self.engine.save_checkpoint(
                str(tmp / "deepspeed"), tag="state", save_latest=False, exclude_frozen_parameters=self.cfg.lora
            )
        params = [p for p in self.model.parameters() if p.requires_grad or not self.cfg.lora]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if self.is_main:
                if self.cfg.lora:
                    # peft's "auto" probes the base model's config.json (absent for .gguf) only to decide
                    # whether embeddings changed; they change only when a target module names them.
                    embeds = any("embed" in m for m in self.cfg.lora_target_modules)
                    self.model.save_pretrained(str(tmp), save_embedding_layers="auto" if embeds else False)
                else:
                    self.model.save_pretrained(str(tmp))
                tok = load_tokenizer(self.cfg)
                if tok is not None:
                    tok.save_pretrained(str(tmp))
        _barrier()
        if self.is_main:
            ckpt.seal(tmp, {**self._trainer_state(), **extra})
            ckpt.publish(tmp, final)
        _barrier()

    def save_last(self) -> None:
        self._save_model(self.out / "last", {}, with_engine_state=True)
        self.saved_step = self.state.step

    def _resume(self) -> None:
        path, saved = ckpt.resolve(self.out / "last"), self.saved
        for key, now in (("train_rows", len(self.train_ds)), ("global_batch", self.global_batch)):
            if saved.get(key) != now:
                raise ckpt.CheckpointError(
                    f"{path}: saved with {key}={saved.get(key)}, this run has {now}: cannot resume exactly"
                )
        load_path, _ = self.engine.load_checkpoint(
            str(path / "deepspeed"), tag="state", load_module_strict=not self.cfg.lora
        )
        if load_path is None:
            raise ckpt.CheckpointError(f"{path}: DeepSpeed could not load the training state")
        self.state = RunState(**{f.name: saved[f.name] for f in dataclasses.fields(RunState) if f.name in saved})
        self.saved_step = self.state.step
        if self.is_main:  # drop events logged after the checkpoint (they will be redone)
            kept = [e for e in read_events(self.out / "metrics.jsonl") if e.get("step", 0) <= self.state.step]
            (self.out / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in kept), encoding="utf-8")
        _barrier()


def train(cfg: TrainConfig, *, on_event: Callable[[Event], None] | None = None) -> list[Event]:
    """Run ``cfg``; returns this process's events. ``on_event`` sees each event after it is logged."""
    return Trainer(cfg, on_event=on_event).run()
