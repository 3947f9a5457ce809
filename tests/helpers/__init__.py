"""Helpers shared by several test files (import them from here, never from another test file):
one package, one module per kind of helper; `from helpers import X` finds each of them."""
from helpers.core import *  # noqa: F401,F403
from helpers.environments import *  # noqa: F401,F403
from helpers.images import *  # noqa: F401,F403
from helpers.runs import *  # noqa: F401,F403
from helpers.serving import *  # noqa: F401,F403
from helpers.shards import *  # noqa: F401,F403
from helpers.syncs import *  # noqa: F401,F403
from helpers.wandb_files import *  # noqa: F401,F403
