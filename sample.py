"""Sample from a trained charrnn: python sample.py --prompt "ROMEO:" (see --help)."""

from charrnn.cli.sample import main

raise SystemExit(main())
