"""Sample from a trained charrnn: python sample.py --prompt "ROMEO:" (see --help)."""
from charrnn.cli import sample_main

raise SystemExit(sample_main())
