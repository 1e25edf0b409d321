"""How a phrase fares in CLIP's 77-token context.

Phrases are never shortened by the data pipeline: the dataset returns them whole
and the model's tokenizer (open_clip) truncates a phrase longer than the context,
forcing the last kept token to end-of-text. These helpers report when that happens.
"""
from functools import lru_cache

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
