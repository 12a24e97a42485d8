"""Data path: instruction records → prompts → token ids with loss masks; pre-training blocks."""
