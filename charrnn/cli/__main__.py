"""``python -m charrnn.cli COMMAND ...``, the same as ``charrnn COMMAND ...``."""

import sys

from .main import main

sys.exit(main())
