"""`python -m memwise.distributed CONFIG.json`: one rank of a run that `launch_train` started under torchrun."""

from memwise.distributed.worker import main

main()
