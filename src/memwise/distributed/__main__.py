"""`python -m memwise.distributed CONFIG.json`: one rank of a run that `launch_train` started under torchrun."""

import sys

from memwise.distributed.worker import main

sys.exit(main())
