"""`python -m malaria_detect.cli`: the command line (torchrun runs it so)."""

import sys

from . import main

sys.exit(main())
