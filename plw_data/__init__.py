"""plw-data: instruction-tuning data with a prompt-loss-weight (PLW).

The package follows the data flow (docs/layout.md):

    schema     the prepared-directory format: columns, category codes, manifest (one module)
    prepare/   raw rows -> formats -> render/tokenize/mask -> pack -> shards -> manifest; merge, verify, inspect
    rg/        generation-ratio statistics over raw inputs or prepared directories
    batch/     what any trainer imports: PLWCollator, the fused weighted CE, eval metrics
    train/     plw-train: config, DeepSpeed, data order, model, loop, checkpoints
"""

__version__ = "0.1.0"

__all__ = ["PLWCollator", "model_inputs", "weighted_ce_sum", "__version__"]


def __getattr__(name: str):
    # Lazy: importing torch costs seconds; `plw-data --help` must stay instant.
    if name in ("PLWCollator", "model_inputs"):
        from .batch import collate

        return getattr(collate, name)
    if name == "weighted_ce_sum":
        from .batch.loss import weighted_ce_sum

        return weighted_ce_sum
    raise AttributeError(name)
