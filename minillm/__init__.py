"""minillm: distil large causal language models into small ones (MiniLLM, KD, SeqKD, GKD)."""

__version__ = "0.1.0"
