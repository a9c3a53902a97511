"""Prompts as users write them: AUTOMATIC1111's weighting syntax, BREAK, and prompts past CLIP's 77 tokens."""
