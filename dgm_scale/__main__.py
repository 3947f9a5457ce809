import sys

from dgm_scale.cli import main

sys.exit(main())
