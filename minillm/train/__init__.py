"""Training stages on one engine: SFT, KD, SeqKD, GKD and MiniLLM."""
