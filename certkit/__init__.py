"""certkit: train neural classifiers to be certifiably robust, and certify them.

The data flow is one line: dataset → model (normalization is its first layer; noise lives in [0, 1] pixel
space) → objective (a training loss on a batch) → trainer → checkpoint → certifier → result TSV → report.
"""

__version__ = "0.1.0"
