"""cnnkit: train, evaluate and use CNN image classifiers."""

import time

# When this process started using cnnkit: the clock of `cnnkit train --time-budget`.
STARTED = time.perf_counter()

__version__ = "0.1.0"
