"""`python -m momtitan.train`: torchtitan's `main` with momtitan's trainer (`momtitan.train.trainer`,
which checks the parallelism degrees before the device mesh is built) and TrainSpec, then leaves
the process with `os._exit` once training has ended and the process groups are destroyed.

Why not `-m torchtitan.train` (which also trains): it runs torchtitan's own trainer, without that
check; and on CPU (gloo) a rank that finishes before its peers sometimes aborts in the
interpreter's teardown, after its last step and after `destroy_process_group` ("terminate called
without an active exception"; seen in this repo's two-rank CPU tests of FSDP and expert
parallelism), and the run then exits non-zero. Skipping the teardown, once the logs are flushed,
avoids that. A failure still raises and exits non-zero as before.
"""

import logging
import os
import sys

# runpy has imported the package `momtitan.train` (its CPU shims, the "mom" TrainSpec) before this module
from torchtitan.train import main

from momtitan.train.trainer import MoMTrainer

if __name__ == "__main__":
    main(MoMTrainer)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
