"""CLIP tokens of a phrase, and how a phrase fares in CLIP's 77-token context.

Phrases are never shortened by the dataset: the collate step tokenises them with open_clip's tokenizer,
which truncates a phrase longer than the context, forcing the last kept token to end-of-text (as the
official code). `is_truncated` reports when that happens.
"""
from functools import lru_cache
from typing import List

import open_clip
import torch

CONTEXT_LENGTH = 77


@lru_cache(maxsize=1)
def _tokenizer():
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer()


def clip_token_count(phrase: str) -> int:
    """Number of CLIP tokens the phrase needs, start- and end-of-text included."""
    return len(_tokenizer().encode(phrase)) + 2


def is_truncated(phrase: str, context_length: int = CONTEXT_LENGTH) -> bool:
    """True when the tokenizer will cut the phrase to fit ``context_length`` tokens."""
    return clip_token_count(phrase) > context_length


def tokenize(phrases: List[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """Lower-cased CLIP BPE ids [B, context_length], zero-padded, truncated with EOT forced last."""
    return open_clip.tokenize([p.lower() for p in phrases], context_length=context_length)
