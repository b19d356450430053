import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="module")
def single_process():
    """TP=1 megatron parallel state in this process (torn down only if we set it up)."""
    from megatron.core import parallel_state

    from slime.backends.megatron_utils.parallel import destroy_parallel, init_parallel
    from tests._support.dist import free_port

    owned = not parallel_state.model_parallel_is_initialized()
    init_parallel(0, 1, master_port=free_port())
    yield
    if owned:
        destroy_parallel()
