"""``python -m certkit`` (used by ``torchrun ... -m certkit train``)."""

import sys

from certkit.cli import main

sys.exit(main())
