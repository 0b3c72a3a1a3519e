import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402

from evomerge.zoo import PREBUILT, load_zoo  # noqa: E402


@pytest.fixture(scope="session")
def quick_zoo(tmp_path_factory):
    """A tiny zoo built once per test session with `build_zoo(quick=True)` (seconds)."""
    from evomerge.zoo.build import build_zoo

    path = tmp_path_factory.mktemp("zoo") / "quick"
    build_zoo(path, quick=True, log=lambda _: None)
    return load_zoo(path)


@pytest.fixture(scope="session")
def zoo():
    """The prebuilt zoo shipped with the package."""
    if not (PREBUILT / "zoo.json").exists():
        pytest.fail(f"the prebuilt zoo is missing from {PREBUILT}")
    return load_zoo()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs, no dashboard); pools reuse it."""
    import logging

    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()
