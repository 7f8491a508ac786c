"""``python -m pagewarden``."""

import sys

from pagewarden.cli import main

sys.exit(main())
