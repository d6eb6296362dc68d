"""Train on prepared shards with transformers' ``Trainer`` or TRL's ``SFTTrainer``: plw-train's exact loss.

Usage (docs/hf.md)::

    from plw_data import PLWCollator
    from plw_data.hf import PLWTrainer            # or PLWSFTTrainer (needs trl: pip install plw-data[trl])

    trainer = PLWTrainer(model=model, args=TrainingArguments(...), train_dataset=ds["train"],
                         eval_dataset=ds["eval"], data_collator=PLWCollator(prompt_loss_weight=0.1))

The loss of an update is Σ w·CE / Σ w with Σ w over the whole gradient-accumulation window and all
ranks, as in :mod:`plw_data.train.trainer`: :meth:`PLWTrainerMixin.get_batch_samples` (public
transformers hook) sums the window's target weights and all-reduces them; each micro-batch then
back-propagates ``weighted_ce_sum · world / W`` (DDP and DeepSpeed average gradients over ranks,
``world`` undoes it; ``loss_is_scaled_for_ga`` stops the Trainer dividing by the accumulation
steps). The CE is the fused chunked one of :mod:`plw_data.batch.loss` on the decoder's final hidden
states (captured by a forward hook, the model's own lm_head runs on one position only:
``logits_to_keep=1``), called through the (possibly DDP-wrapped) model with ``position_ids``
restarting per example, no ``attention_mask`` and ``use_cache=False``.

Data order: epoch e visits the train split in plw-train's permutation of (seed, e)
(:class:`PLWEpochSampler`); accelerate hands micro-batch j of a window to rank ``j % world``, which
is plw-train's slot layout, so a run matches plw-train update for update (tests/test_hf.py).

The one private transformers hook used is ``_get_train_sampler`` (the sampler); tests/test_hf.py pins
the tested transformers/TRL versions and fails when they change.

Evaluation (:meth:`PLWTrainerMixin.evaluate`) gives plw-train's metric keys (eval_completion_loss...,
docs/training.md) from on-device sums, all-reduced, and hands them to the callbacks, so
``metric_for_best_model="eval_completion_loss"``, ``load_best_model_at_end`` and
``EarlyStoppingCallback`` work.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from typing import Any

import numpy as np
import torch
import transformers

from .batch.collate import PLWCollator, model_inputs
from .batch.loss import token_ce_and_argmax, weighted_ce_sum
from .batch.metrics import N_SUMS, eval_sums, eval_sums_by_source, metrics_by_source, metrics_from_sums
from .errors import ConfigError
from .train.data import closing_ids, target_weight
from .train.model import check_plain_logits, decoder_and_head
from .train.order import epoch_permutation

__all__ = ["PLWTrainer", "PLWTrainerMixin", "PLWEpochSampler", "PLWSFTTrainer"]  # noqa: F822 (PLWSFTTrainer: lazy, needs trl)

#: Versions the private hook (``_get_train_sampler``) was tested with (tests/test_hf.py pins them).
TESTED_VERSIONS = {"transformers": "5.24.0", "trl": "1.16.0"}


class PLWEpochSampler(torch.utils.data.Sampler):
    """plw-train's row order: epoch e is ``epoch_permutation(n, seed, e)`` (``set_epoch`` is called by the Trainer)."""

    def __init__(self, n_rows: int, seed: int) -> None:
        self.n_rows, self.seed, self.epoch = n_rows, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        return iter(epoch_permutation(self.n_rows, self.seed, self.epoch).tolist())

    def __len__(self) -> int:
        return self.n_rows


class PLWTrainerMixin:
    """The PLW loss, data order and eval for any ``transformers.Trainer`` subclass (put it first in the bases).

    ``data_collator``: a :class:`PLWCollator` (passed through untouched) or a dict of its keyword
    arguments; anything else is refused. ``loss_chunk_size``: target tokens per chunk of the fused CE.
    """

    #: Read by :class:`plw_data.batch.collate.PLWBatch`: this trainer's ``compute_loss`` is the PLW loss.
    computes_plw_loss = True

    def __init__(self, *args: Any, loss_chunk_size: int | None = None, **kwargs: Any) -> None:
        if args:  # positional as for the trainer class: Trainer(model, args, data_collator, ...)
            kwargs.update(zip(inspect.signature(super().__init__).parameters, args))
        collator = kwargs.get("data_collator")
        if isinstance(collator, dict):
            collator = PLWCollator(**collator)
        if not isinstance(collator, PLWCollator):
            got = "none" if collator is None else type(collator).__name__
            raise ConfigError(
                f"{type(self).__name__} needs data_collator=PLWCollator(prompt_loss_weight=...) (got {got})"
            )
        kwargs["data_collator"] = collator
        for name in ("compute_metrics", "preprocess_logits_for_metrics"):
            if kwargs.get(name) is not None:  # evaluate() below never calls them: say so, not ignore them
                raise ConfigError(
                    f"{type(self).__name__} reports plw-train's eval metrics (eval_completion_loss, ...) and does not "
                    f"call {name}: remove it, or override evaluate() for other metrics"
                )
        train_args = kwargs.get("args")
        train_args = self._default_args() if train_args is None else copy.copy(train_args)  # caller's stays as is
        train_args.remove_unused_columns = False  # the collator needs the mask columns
        self._check_args(train_args, kwargs)
        kwargs["args"] = train_args
        self.loss_chunk_size = loss_chunk_size
        self._hidden: torch.Tensor | None = None
        self._hooked: set[int] = set()
        super().__init__(**kwargs)
        self.loss_is_scaled_for_ga = True  # compute_loss divides by the window's Σw itself
        model = self.model
        check_plain_logits(model.config)
        attn = str(getattr(model.config, "_attn_implementation", ""))
        if "flash" in attn and not collator.emit_cu_seqlens and self.args.per_device_train_batch_size > 1:
            raise ConfigError(
                f"{attn} with more than one row per batch needs PLWCollator(emit_cu_seqlens=True) "
                "(packed examples would attend to each other)"
            )
        self.eval_collator = PLWCollator(
            prompt_loss_weight=1.0,
            completion_weight=1.0,
            pad_to_multiple_of=collator.pad_to_multiple_of,
            pad_token_id=collator.pad_token_id,
            emit_cu_seqlens=collator.emit_cu_seqlens,
            return_example_ids=True,
        )
        self.eval_source_names = list(collator.sources or ())  # a mixture: metrics per source too
        self._logits_to_keep = "logits_to_keep" in _forward_parameters(model)

    def _default_args(self) -> Any:
        return transformers.TrainingArguments(output_dir="trainer_output")

    def _check_args(self, train_args: Any, kwargs: dict[str, Any]) -> None:
        """Subclasses refuse argument values that would change the prepared rows (see PLWSFTTrainer)."""

    # ----------------------------------------------------------------- data order

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not hasattr(dataset, "__len__"):  # an IterableDataset keeps its own order
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return PLWEpochSampler(len(dataset), seed)

    # ----------------------------------------------------------------- loss

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """The window's micro-batches and W = Σ target weight over them and all ranks (float64 tensor)."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        local = torch.tensor(sum(target_weight(b) for b in batches), dtype=torch.float64, device=device)
        total = self.accelerator.reduce(local, reduction="sum") if self.accelerator.num_processes > 1 else local
        return batches, total

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """``weighted_ce_sum · world / W``; without W (a lone batch) the batch's own Σ w·CE / Σ w."""
        hidden, outputs = self._final_hidden(model, inputs)
        _, head = decoder_and_head(self.accelerator.unwrap_model(model))
        with whole_parameters(head):
            ce_sum = weighted_ce_sum(
                hidden, head.weight, inputs["labels"], inputs["loss_weights"],
                chunk_size=self.loss_chunk_size, lm_head_bias=head.bias,
            )
        if num_items_in_batch is None:
            total, scale = target_weight(inputs), 1.0
        else:
            total, scale = float(num_items_in_batch), float(self.accelerator.num_processes)
        loss = ce_sum * (scale / total if total > 0 else 0.0)  # a window without targets: loss 0, no gradient
        return (loss, outputs) if return_outputs else loss

    def _final_hidden(self, model, inputs) -> tuple[torch.Tensor, Any]:
        """Run ``model`` (through its DDP/DeepSpeed wrapper) and return the decoder's final hidden states."""
        decoder, _ = decoder_and_head(self.accelerator.unwrap_model(model))
        if id(decoder) not in self._hooked:
            decoder.register_forward_hook(self._keep_hidden)
            self._hooked.add(id(decoder))
        kwargs = model_inputs(inputs)
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        self._hidden = None
        outputs = model(**kwargs)
        hidden, self._hidden = self._hidden, None
        if hidden is None:
            raise RuntimeError(f"{type(decoder).__name__} did not run: cannot read the final hidden states")
        return hidden, outputs

    def _keep_hidden(self, module, args, output) -> None:
        self._hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    # ----------------------------------------------------------------- eval

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """plw-train's eval metrics on ``eval_dataset`` (default: the trainer's), logged and given to callbacks."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        if isinstance(dataset, dict):
            out: dict[str, float] = {}
            for name, part in dataset.items():
                out.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return out
        if dataset is None:
            raise ConfigError("evaluate() needs an eval_dataset (a prepared split, e.g. load_from_disk(DIR)['eval'])")
        metrics = self.plw_eval_metrics(dataset)
        metrics = {metric_key_prefix + k[len("eval") :]: v for k, v in metrics.items() if v is not None}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    @torch.no_grad()
    def plw_eval_metrics(self, dataset) -> dict[str, float | None]:
        """Rows ``rank::world`` of ``dataset`` in batches of ``per_device_eval_batch_size``; sums all-reduced."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        mine = np.arange(rank, len(dataset), world)
        bs = self.args.per_device_eval_batch_size
        n_batches = math.ceil(math.ceil(len(dataset) / world) / bs)
        device = self.args.device
        model = self.model
        _, head = decoder_and_head(model)
        closing = torch.tensor(closing_ids(model.config, self.processing_class), dtype=torch.long, device=device)
        sums = torch.zeros(N_SUMS, dtype=torch.float64, device=device)
        names = self.eval_source_names
        by_source = torch.zeros((len(names), N_SUMS), dtype=torch.float64, device=device)
        was_training = model.training
        model.eval()
        try:
            for b in range(n_batches):
                rows = mine[b * bs : (b + 1) * bs]
                if len(rows) == 0:  # this rank has fewer rows: it still joins the all-reduce
                    continue
                batch = self._prepare_inputs(self.eval_collator(dataset[[int(i) for i in rows]]))
                hidden, _ = self._final_hidden(model, batch)
                with whole_parameters(head):
                    ce, correct = token_ce_and_argmax(
                        hidden, head.weight, batch["labels"], chunk_size=self.loss_chunk_size, lm_head_bias=head.bias
                    )
                on = [batch[k] for k in ("labels", "category", "example_id", "input_ids")]
                sums += eval_sums(ce, correct, *on, closing)
                if names and "source_id" in batch:
                    by_source += eval_sums_by_source(ce, correct, *on, closing, batch["source_id"], len(names))
        finally:
            model.train(was_training)
        if world > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
            by_source = self.accelerator.reduce(by_source, reduction="sum")
        return {**metrics_from_sums(sums), **(metrics_by_source(by_source, names) if names else {})}


@contextlib.contextmanager
def whole_parameters(module):
    """Gather ``module``'s own parameters where DeepSpeed ZeRO-3 partitions them (a no-op otherwise).

    ZeRO-3 gathers a module's weights only for that module's forward and backward; the fused loss
    reads the lm_head weight after the model's forward has returned. Its gradient is computed in that
    call, so the weight is not needed again in backward.
    """
    params = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _forward_parameters(model) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


class PLWTrainer(PLWTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` with plw-train's loss, data order and eval metrics (module docstring)."""


class PLWSFTMixin(PLWTrainerMixin):
    """:class:`PLWTrainerMixin` for TRL's ``SFTTrainer``: the prepared rows are used as they are.

    Sets ``dataset_kwargs={"skip_prepare_dataset": True}`` (TRL would otherwise rebuild labels from
    ``completion_mask`` alone and truncate), and refuses ``packing=True`` (TRL re-packs the rows and
    drops their example boundaries) and a ``max_length`` below the longest prepared row (it would cut
    completion tokens): each with one line naming the fix.
    """

    def _default_args(self) -> Any:
        from trl import SFTConfig

        return SFTConfig(output_dir="trainer_output")

    def _check_args(self, train_args: Any, kwargs: dict[str, Any]) -> None:
        if getattr(train_args, "packing", False):
            raise ConfigError(
                "SFTConfig(packing=True) re-packs prepared rows and loses their example boundaries: set "
                "packing=False (plw-data prepare --pack already packed them)"
            )
        max_length = getattr(train_args, "max_length", None)
        if max_length is not None:
            for name in ("train_dataset", "eval_dataset"):
                longest = _longest_row(kwargs.get(name))
                if longest > max_length:
                    raise ConfigError(
                        f"SFTConfig(max_length={max_length}) is below the longest prepared row of {name} ({longest} "
                        f"tokens) and would cut completion tokens: set max_length=None, or prepare with "
                        f"plw-data prepare --max-length {max_length}"
                    )
        train_args.dataset_kwargs = {**(train_args.dataset_kwargs or {}), "skip_prepare_dataset": True}


def _longest_row(dataset) -> int:
    """Longest row (tokens) of a prepared split (0 for None; a dict of splits: over all)."""
    if dataset is None:
        return 0
    if isinstance(dataset, dict):
        return max((_longest_row(d) for d in dataset.values()), default=0)
    import pyarrow.compute as pc

    from . import schema as S

    if hasattr(dataset, "data"):  # a datasets.Dataset: the Arrow column, no row decoding
        return int(pc.max(pc.list_value_length(dataset.data.table.column(S.INPUT_IDS))).as_py() or 0)
    return max((len(r[S.INPUT_IDS]) for r in dataset), default=0)


_SFT: dict[str, type] = {}


def __getattr__(name: str):
    # PLWSFTTrainer needs trl (an optional extra): built on first use.
    if name == "PLWSFTTrainer":
        if "cls" not in _SFT:
            try:
                from trl import SFTTrainer
            except ImportError:
                raise ImportError("PLWSFTTrainer needs TRL: pip install 'plw-data[trl]'") from None

            class PLWSFTTrainer(PLWSFTMixin, SFTTrainer):
                """TRL's ``SFTTrainer`` with plw-train's loss, data order and eval metrics (:class:`PLWSFTMixin`)."""

            PLWSFTTrainer.__module__ = __name__
            _SFT["cls"] = PLWSFTTrainer
        return _SFT["cls"]
    raise AttributeError(name)
