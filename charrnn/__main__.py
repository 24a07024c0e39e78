"""``python -m charrnn COMMAND ...``, the same as ``charrnn COMMAND ...``."""

import sys

from charrnn.cli.main import main

sys.exit(main())
