"""Caches that every load builds on its first use, built once in the loader template (as
a PRELOAD module: importing it builds them), so that each forked loader inherits them
instead of building them again.

transformers' checkpoint conversion table: `from_pretrained` asks it for every model, and
the first ask builds the whole table (~1,200 renaming rules, ~900 regular expressions
compiled): ~0.1 s of every load in a fresh process, 60% of a small model's
`from_pretrained` in a loader. Built here, a loader only deep-copies its model's entry."""

from __future__ import annotations


def warm() -> bool:
    """Build what this transformers caches lazily; False where it has no such cache."""
    try:
        from transformers import conversion_mapping
    except ImportError:  # an older transformers: nothing to warm
        return False
    build = getattr(conversion_mapping, "get_checkpoint_conversion_mapping", None)
    if build is None:
        return False
    build("llama")  # any model type: the first call builds the table for all of them
    return True


warm()
