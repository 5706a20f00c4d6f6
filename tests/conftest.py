import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# flows run in-process start Prefect's temporary server: give it time on 2 busy cores
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# stages called outside a flow log to the console only, as under the `unisd` command (unisd.console)
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

from tiny import build_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is faster, and much faster on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def real_model_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M-Instruct, converted from its pinned wheel once per session."""
    from unisd.assets import materialize_model

    out = tmp_path_factory.mktemp("real-model")
    materialize_model("smollm2-135m-instruct", None, out)
    return out


@pytest.fixture(scope="session")
def decode_kernel():
    """The fast backend's compiled decode attention: skipped where there is no C++ compiler,
    a failure where there is one and it does not build."""
    import shutil

    from unisd import decode_attention

    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler to build the kernel")
    kernel = decode_attention.kernel()
    assert kernel is not None, "the kernel did not build on a machine with a C++ compiler"
    return kernel


@pytest.fixture
def prefect_storage(tmp_path, monkeypatch) -> Path:
    """Prefect's result storage, its task cache, in this test's folder: for flows run in
    this process and for the processes the test starts. Prefect reads its settings from
    the environment once, on import, so the environment alone reaches only the latter."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    path = tmp_path / "prefect-results"
    monkeypatch.setenv("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(path))
    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: path}):
        yield path


@pytest.fixture(scope="session", autouse=True)
def stop_prefect_temporary_server():
    """Stop the temporary Prefect server that in-process flows started, after their last
    log lines reached it and while pytest's output is still open: left to Prefect's atexit
    hook, its "Stopping temporary server" line goes to a closed stream (a logging traceback
    after the summary) and the flows' last lines find no server ("Error logging to API")."""
    yield
    server = sys.modules.get("prefect.server.api.server")
    if server is not None:
        from unisd.orchestration.serve import send_queued_logs

        send_queued_logs()
        for instance in list(server.SubprocessASGIServer._instances.values()):
            instance.stop()
