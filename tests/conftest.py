import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory):
    """A tiny float32 Llama base and three experts on disk: [base, expert_1, expert_2, expert_3]."""
    from mergekit_wudi.toy import make_llama_family

    return make_llama_family(tmp_path_factory.mktemp("family"), num_experts=3)
