"""Train a character-level RNN: python train.py --data shakespeare (see --help)."""
from charrnn.cli import train_main

raise SystemExit(train_main())
