"""The batch side any trainer imports: `collate.PLWCollator` (rows -> tensors with weights),
`loss.weighted_ce_sum` (the fused Σ w·CE), `metrics` (per-category eval losses by on-device sums)."""
