import pytest

from tests.services.coordinator.helpers import start_workers


@pytest.fixture(scope="module", params=["in-process", "grpc"])
def workers(request, quick_family):
    placement, worker_objects, stop = start_workers(quick_family, request.param)
    yield placement, worker_objects
    stop()
