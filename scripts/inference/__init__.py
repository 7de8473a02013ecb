"""Inference: the pair stage, the registrar, the gland segmenter, stage timing and memory settings."""
