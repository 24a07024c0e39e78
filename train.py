"""Train a character-level RNN: python train.py --data shakespeare (see --help)."""

from charrnn.cli.train import main

raise SystemExit(main())
