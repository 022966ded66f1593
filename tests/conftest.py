import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator: tests are reproducible."""
    return torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Tests never read or write the user's ~/.cache/fewflow: cached classifiers go to a session folder."""
    old = os.environ.get("FEWFLOW_CACHE")
    os.environ["FEWFLOW_CACHE"] = str(tmp_path_factory.mktemp("fewflow-cache"))
    yield
    if old is None:
        os.environ.pop("FEWFLOW_CACHE", None)
    else:
        os.environ["FEWFLOW_CACHE"] = old
