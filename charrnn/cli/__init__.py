"""The command line: one module per ``charrnn`` subcommand (``train``, ``sample``, ``chat``, ``serve``, ``score``, ``export``, ``push``,
``inspect``, ``plot``), the shared toolkit (``options``) and the dispatcher (``main``).

Nothing in charrnn imports this package: it only parses flags and calls the library.
"""
