"""The workers' entry when they are started by a fork server (launch.py) rather than as fresh
interpreters: torchrun runs this file with runpy in each forked process, where torch and segscale
are already imported. It exits through SystemExit, not os._exit like `python -m segscale.worker`,
so that torch's multiprocessing wrapper records the worker's exit code and return value."""

import sys

from segscale.worker import main

# A process started from this one by spawn or forkserver (a DataLoader's, say) imports this file
# again as __mp_main__: it must not run a second worker.
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
