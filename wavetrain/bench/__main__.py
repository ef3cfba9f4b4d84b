"""``python -m wavetrain.bench``: see wavetrain/bench/__init__.py."""
import os
import sys

from wavetrain.bench.cli import main

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.exit(main())
