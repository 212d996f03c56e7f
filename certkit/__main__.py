"""``python -m certkit`` (used by ``torchrun ... -m certkit train``)."""

from certkit.cli import run

run()
