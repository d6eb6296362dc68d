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
attention mask (packed examples stay isolated, see :mod:`plw_data.batch.collate`), and the loss runs on
the final hidden states with the lm_head weight (:mod:`plw_data.batch.loss`), never full logits. The
module DeepSpeed wraps is decoder + loss; under ZeRO-3 the lm_head weight is registered as an
external parameter of it, so it is gathered for the loss (the fused loss needs no weight in backward).

A non-finite window loss stops the run before that update is applied (TrainingError naming the step).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import schema as S
from ..errors import ConfigError, PLWError
from . import checkpoint as ckpt
from .config import TrainConfig
from .data import (
    closing_ids, collate_rows, eval_path, eval_sources, load_split, model_kwargs, run_tokenizer, target_weight,
    tokenizer_files, verify_data,
)
from .distributed import all_reduce_sum, barrier, default_dist_env, init_distributed
from .ds_config import build_ds_config, load_ds_config
from .model import build_engine, load_model, loss_module, resolve_dtype
from .order import epoch_permutation, rank_slots, steps_per_epoch, update_seed
from .plots import plot_metrics, read_events
from .schedule import Schedule

Event = dict[str, Any]


class TrainingError(PLWError):
    """Training cannot go on (e.g. a non-finite loss)."""


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
        cfg = copy.copy(cfg)  # keeps the schedules parsed by validate()
        cfg.dtype = resolve_dtype(cfg.dtype)
        self.cfg = cfg
        self.on_event = on_event
        self.out = Path(cfg.output)
        self.rank, self.world = init_distributed()
        self.is_main = self.rank == 0
        # On resume, fail fast (before loading the model) on a missing, partial or corrupt checkpoint.
        self.saved = ckpt.claim_output(self.out, resume=cfg.resume, overwrite=cfg.overwrite, is_main=self.is_main)
        verify_data(cfg)
        self.train_ds = load_split(Path(cfg.data) / "train", "train")
        eval_dir = eval_path(cfg)
        self.eval_ds = load_split(eval_dir, "eval") if eval_dir else None
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
        manifest_path = Path(cfg.data) / S.MANIFEST
        self.sources, self.plw = cfg.plw_for(S.read_manifest(cfg.data) if manifest_path.is_file() else {})
        if cfg.prompt_share is not None and self.is_main:
            print(f"plw-train: --prompt-share {cfg.prompt_share}: PLW {_plw_text(self.plw)}", file=sys.stderr)
        self.eval_sources = eval_sources(eval_dir) if self.eval_ds is not None else None
        self.template: Schedule | None = cfg.template_schedule

        torch.manual_seed(cfg.seed)  # LoRA initialisation
        model = load_model(cfg, base_dir=self.out / "base")
        barrier()  # rank 0 may have written OUT/base (a .gguf model's dequantised base)
        self.model = model
        tok = run_tokenizer(cfg)  # needed only here and in each checkpoint: not kept through training
        self.closing_ids = torch.tensor(closing_ids(model.config, tok), dtype=torch.long)
        self.tokenizer_files = tokenizer_files(tok) if tok is not None and self.is_main else {}
        del tok
        pad = getattr(model.config, "pad_token_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) else 0
        self.flash = "flash" in str(getattr(model.config, "_attn_implementation", ""))
        self.ds_config = ds_config
        self.engine = build_engine(loss_module(model, cfg.loss_chunk_size), model, cfg, ds_config, self.total_steps)
        self.train_collate = self._collator(eval_mode=False)
        self.eval_collate = self._collator(eval_mode=True)
        self.state = RunState()
        self.saved_step: int | None = None
        self.events: list[Event] = []
        self.table = None
        self.t0 = time.time()

    # ----------------------------------------------------------------- setup helpers

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
        from .plots import LiveTable

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
            if self.cfg.merge_adapter and self.is_main:
                from ..export import merge_adapter

                best = self.out / "best"
                merge_adapter(best if best.is_dir() else self.out / "last", self.out / "merged", dtype=self.cfg.dtype)
            barrier()
            self._plot()
        finally:
            if self.table is not None:
                self.table.close()
        return self.events

    def _summary(self) -> str:
        n_all = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        template = self.cfg.template_weight if self.cfg.template_weight is not None else "= PLW"
        chosen = f" (from --prompt-share {self.cfg.prompt_share})" if self.cfg.prompt_share is not None else ""
        return (
            f"plw-train: {self.cfg.model} ({n_train:,} of {n_all:,} parameters trained, {self.cfg.dtype}, "
            f"ZeRO {self.engine.zero_optimization_stage()}); {self.world} rank(s) x {self.accum} x {self.micro} rows "
            f"per update; {self.total_steps} updates ({self.steps_per_epoch} per epoch); "
            f"PLW {_plw_text(self.plw)}{chosen}, template {template}"
        )

    def _collator(self, *, eval_mode: bool):
        """Train: weights set per update (:meth:`_weights`); eval: every token a target, with categories."""
        from ..batch.collate import PLWCollator

        return PLWCollator(
            prompt_loss_weight=1.0,
            completion_weight=1.0,
            pad_to_multiple_of=self.cfg.pad_to_multiple_of,
            pad_token_id=self.pad_id,
            emit_cu_seqlens=self.flash,
            return_example_ids=eval_mode,
            **({"sources": self.sources} if self.sources else {}),
        )

    def _weights(self, step: int) -> tuple[float | dict[str, float], float | None, float, float]:
        """(PLW or a PLW per source, template weight or None for "= PLW", completion, reasoning weight)
        at update ``step``."""
        at = (step, self.total_steps, self.steps_per_epoch)
        template = None if self.template is None else self.template.value(*at)
        plw = self.plw.value(*at) if isinstance(self.plw, Schedule) else {n: s.value(*at) for n, s in self.plw.items()}
        return plw, template, self.cfg.completion_weight, self.cfg.reasoning_weight

    def train_step(self) -> Event:
        """One update: collate the window, all-reduce Σw, then forward/backward each micro-batch."""
        import torch

        step = self.state.step
        epoch, offset = divmod(step, self.steps_per_epoch)
        order = epoch_permutation(len(self.train_ds), self.cfg.seed, epoch)
        window = order[offset * self.global_batch : (offset + 1) * self.global_batch]
        collate = self.train_collate
        collate.set_weights(*self._weights(step))
        slots = rank_slots(window, micro=self.micro, accum=self.accum, world=self.world, rank=self.rank)
        batches = [collate_rows(collate, self.train_ds, rows, int(window[0])) for rows in slots]
        device = self.engine.device
        local_w = torch.tensor(sum(target_weight(b) for b in batches), dtype=torch.float64, device=device)
        total_w = all_reduce_sum(local_w)
        denom = float(total_w) if float(total_w) > 0 else 1.0  # a window without targets: loss 0, no gradient

        torch.manual_seed(update_seed(self.cfg.seed, step, self.rank))
        self.engine.train()
        local = torch.zeros((), dtype=torch.float64, device=device)
        lr = self.engine.get_lr()[0]
        for i, batch in enumerate(batches):
            ce_sum = self.engine(**model_kwargs(batch, device, with_weights=True))
            local += ce_sum.detach().double()
            if i == len(batches) - 1:
                train_loss = float(all_reduce_sum(local.clone())) / denom
                if not math.isfinite(train_loss):
                    raise TrainingError(
                        f"non-finite train loss ({train_loss}) at step {step + 1}; stopped before applying that update"
                    )
            self.engine.backward(ce_sum * (self.world / denom), scale_wrt_gas=False)
            # Drop this micro-batch's graph before the next forward allocates: held one forward
            # longer, it made the allocator keep ~0.3 GB more (peak RSS 2.8 -> 2.5 GB, SmolLM2 LoRA).
            del ce_sum
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

        from ..batch.metrics import (
            N_SUMS, eval_sums, eval_sums_by_source, metrics_by_source, metrics_from_sums, source_of_tokens,
        )

        assert self.eval_ds is not None
        bs = self.cfg.eval_batch_size or self.micro
        mine = np.arange(self.rank, len(self.eval_ds), self.world)
        n_batches = math.ceil(math.ceil(len(self.eval_ds) / self.world) / bs)
        collate = self.eval_collate
        device = self.engine.device
        sums = torch.zeros(N_SUMS, dtype=torch.float64, device=device)
        by_source = None if self.eval_sources is None else torch.zeros(
            len(self.eval_sources[0]), N_SUMS, dtype=torch.float64, device=device)
        self.engine.eval()
        with torch.no_grad():
            for b in range(n_batches):
                batch = collate_rows(collate, self.eval_ds, mine[b * bs : (b + 1) * bs], 0)
                ce, correct = self.engine(**model_kwargs(batch, device, with_weights=False))
                on = [batch[k].to(device) for k in ("labels", "category", "example_id", "input_ids")]
                sums += eval_sums(ce, correct, *on, self.closing_ids)
                if by_source is not None:
                    source = source_of_tokens(on[2], torch.as_tensor(self.eval_sources[1], device=device))
                    by_source += eval_sums_by_source(ce, correct, *on, self.closing_ids, source, len(self.eval_sources[0]))
        self.engine.train()
        metrics = metrics_from_sums(all_reduce_sum(sums))
        if by_source is not None:
            metrics.update(metrics_by_source(all_reduce_sum(by_source), self.eval_sources[0]))
        return metrics

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
        barrier()
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
                for name, data in self.tokenizer_files.items():
                    (tmp / name).write_bytes(data)
        barrier()
        if self.is_main:
            ckpt.seal(tmp, {**self._trainer_state(), **extra})
            ckpt.publish(tmp, final)
        barrier()

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
        barrier()


def _plw_text(plw: Schedule | dict[str, Schedule]) -> str:
    return str(plw) if isinstance(plw, Schedule) else ", ".join(f"{n}={s}" for n, s in plw.items())


def train(cfg: TrainConfig, *, on_event: Callable[[Event], None] | None = None) -> list[Event]:
    """Run ``cfg``; returns this process's events. ``on_event`` sees each event after it is logged."""
    return Trainer(cfg, on_event=on_event).run()
