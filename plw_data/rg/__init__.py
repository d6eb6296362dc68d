"""Generation-ratio (Rg) statistics: `measure` counts, `stats` summarises, `plot` draws."""
