"""The decoders behind `minillm.rollout.sample_rollout`: the eager reference (`eager.py`), the static-cache
fast path (`fast.py`), the oneDNN weight packing it uses on CPU (`packing.py`), the model calls both make with
a KV cache (`cache.py`) and the distributions and draw they share: warping, mixing, the n-gram ban and the
inverse-CDF draw (`draw.py`). The design and its departures are in `minillm/rollout.py`'s docstring."""
