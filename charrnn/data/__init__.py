"""Data: find and read corpora (``corpus``), encode them once into a token cache (``token_cache``), and lay
the training split out as stateful batch streams (``streams``)."""
