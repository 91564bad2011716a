"""`python -m worker`: same as `star worker`."""
import sys

from worker.main import main

sys.exit(main())
