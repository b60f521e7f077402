import os

import pytest
import torch
from hypothesis import settings

# CI runs many examples; a local run can lower this with HYPOTHESIS_PROFILE=dev.
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=15, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
