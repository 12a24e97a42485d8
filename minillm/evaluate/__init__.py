"""The paper's evaluation (docs/design.md §3): sampled answers scored by Rouge-L, gold LM loss, Dist-4, Rouge-L
per gold-length bucket (`protocol`), exposure bias as ExAccErr (`exposure`), calibration as ECE (`calibration`).
Pure metric functions live in `metrics`, batched sampling and the gold loss in `generate`."""
