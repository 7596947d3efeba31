"""Boot progress read from an engine's own output: ``{"percent": number | null, "stage": text}``.

A 35-minute load shows nothing but "LOADING" unless someone reads the engine's log; each
kind's loader prints where it is (vLLM's tqdm bars and "… took" lines, llama.cpp's stage
lines and load dots, Ollama's scheduler lines), so the reconciler parses those into the
observed state. Pure: a line in, a value or None out. What each rule matches, and where
the text comes from, is in docs/ENGINES.md ("Boot progress").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BootProgress:
    """``percent`` is of the current stage (None: the stage has no measure); ``stage`` says what."""

    percent: float | None
    stage: str

    def to_dict(self) -> dict[str, Any]:
        return {"percent": self.percent, "stage": self.stage}


Build = Callable[[re.Match[str]], BootProgress]
# (a literal every matching line contains: a cheap test before the regex, since every line
#  an engine prints passes here; the pattern; what it means)
Rule = tuple[str, re.Pattern[str], Build]


def _pct(done: str, total: str) -> float:
    whole = int(total)
    return min(100.0, round(100.0 * int(done) / whole, 1)) if whole else 100.0


def _bar(label: str) -> Build:
    """A tqdm bar: ``label: NN% … | n/N [...]``; the percent comes from n/N when present."""
    def build(m: re.Match[str]) -> BootProgress:
        done, total = m.group("done"), m.group("total")
        percent = _pct(done, total) if done is not None and total is not None else float(m.group("pct"))
        counted = f" ({done}/{total})" if done is not None else ""
        return BootProgress(percent, f"{label}{counted}")
    return build


def _fixed(stage: str, percent: float | None = None) -> Build:
    return lambda _m: BootProgress(percent, stage)


def _took(template: str) -> Build:
    return lambda m: BootProgress(None, template.format(m.group("s")))


_TQDM_TAIL = r"\s*(?P<pct>\d{1,3})%[^|]*\|(?:[^|]*\|)?\s*(?:(?P<done>\d+)/(?P<total>\d+))?"

VLLM: tuple[Rule, ...] = (
    ("checkpoint shards", re.compile(r"Loading (?P<what>(?:fast)?safetensors|pt|gguf|bin)? ?checkpoint shards:"
                                     + _TQDM_TAIL),
     _bar("loading checkpoint shards")),
    ("CUDA graph", re.compile(r"Capturing (?P<pre>prefill )?CUDA graph(?:s| shapes)(?: \((?P<mode>[^)]*)\))?:"
                              + _TQDM_TAIL),
     lambda m: _bar("capturing CUDA graphs" + (f" ({m.group('mode')})" if m.group("mode") else ""))(m)),
    ("Starting to load model", re.compile(r"Starting to load model"), _fixed("loading model")),
    ("Loading weights took", re.compile(r"Loading weights took (?P<s>[\d.]+) s"),
     _took("weights loaded in {} s")),
    ("Model loading took", re.compile(r"Model loading took (?P<s>[\d.]+ GiB)"), _took("model loaded ({})")),
    ("Dynamo bytecode transform", re.compile(r"Dynamo bytecode transform time"),
     _fixed("compiling (torch.compile)")),
    ("torch.compile t", re.compile(r"torch\.compile (?:takes|took) (?P<s>[\d.]+) s"),
     _took("torch.compile done in {} s")),
    ("Graph capturing finished", re.compile(r"Graph capturing finished in (?P<s>[\d.]+) sec"),
     _took("CUDA graphs captured in {} s")),
    ("init engine", re.compile(r"init engine \([^)]*\) took (?P<s>[\d.]+) s"),
     _took("engine initialised in {} s (profile, KV cache, warm-up)")),
    ("Starting vLLM", re.compile(r"Starting vLLM (?:API )?server"), _fixed("starting the API server")),
)

# llama.cpp's server (and the llama-server child of Ollama 0.30+). Its default load
# callback prints one "." per percent and a newline at 100 %: a line of dots only.
_DOTS = re.compile(r"^\.{1,100}$")
LLAMACPP: tuple[Rule, ...] = (
    ("loading model", re.compile(r"\b(?:init|load_model|llama_model_load\w*): loading model\b"),
     _fixed("loading model")),
    ("loading model tensors", re.compile(r"load_tensors: loading model tensors"),
     _fixed("loading model tensors")),
    ("layers to GPU", re.compile(r"offloaded (?P<done>\d+)/(?P<total>\d+) layers to GPU"),
     lambda m: BootProgress(None, f"offloaded {m.group('done')}/{m.group('total')} layers to GPU")),
    ("warming up the model", re.compile(r"warming up the model"), _fixed("warming up")),
    ("model loaded", re.compile(r"\b(?:init|main): model loaded\b"), _fixed("model loaded")),
    ("listening on", re.compile(r"\b(?:init|main): (?:server is )?listening on\b"),
     _fixed("listening")),
    ("ailayer-llamacpp:", re.compile(r"^ailayer-llamacpp: .*: loading "), _fixed("loading model")),
)

OLLAMA: tuple[Rule, ...] = (
    ("starting llama server", re.compile(r'msg="?starting llama server'), _fixed("starting the runner")),
    ("model load progress", re.compile(r'msg="model load progress (?P<f>[\d.]+)"'),
     lambda m: BootProgress(round(100.0 * float(m.group("f")), 1), "loading model")),
    ("loading model", re.compile(r'msg="?loading model\b|status="llm server loading model"'),
     _fixed("loading model")),
    ("llama runner started in", re.compile(r"llama runner started in (?P<s>[\d.]+) seconds"),
     _took("runner started in {} s")),
    *LLAMACPP,
)

RULES: dict[str, tuple[Rule, ...]] = {"vllm": VLLM, "llamacpp": LLAMACPP, "ollama": OLLAMA}
# Kinds whose loader prints llama.cpp's dots.
DOTS_KINDS = frozenset({"llamacpp", "ollama"})
TENSORS = "loading model tensors"


def _dots(line: str) -> BootProgress | None:
    if line.startswith(".") and _DOTS.match(line):
        return BootProgress(float(len(line)), TENSORS)
    return None


def parse(kind: str, line: str) -> BootProgress | None:
    """What ``line`` says about the boot, for an engine of ``kind``; None if nothing."""
    rules = RULES.get(kind)
    if rules is None:
        return None
    for literal, pattern, build in rules:
        if literal in line:
            match = pattern.search(line)
            if match is not None:
                return build(match)
    if kind in DOTS_KINDS:
        return _dots(line)
    return None


def latest(kind: str, lines: list[str]) -> BootProgress | None:
    """The last progress any of ``lines`` reports (the lines in the order printed)."""
    for line in reversed(lines):
        found = parse(kind, line)
        if found is not None:
            return found
    return None


# A tqdm bar's end: "NN%|███| n/N [00:01<00:02, 1.5it/s]" or "NN% Completed | n/N [...]".
_BAR_END = re.compile(r"\d{1,3}%(?:\|[^|]*\||[^|]{0,20}\|)\s*\d+/\d+ \[[^\]]*\]")
_LEADING_DOTS = re.compile(r"^\.{1,100}(?=[^.])")


def _dot_lines(text: str) -> bool:
    return text.startswith(".") or "\n." in text


def may_glue(text: str, dots: bool = False) -> bool:
    """Whether any line of ``text`` (lines joined by newlines) may need ``unglue``: a block
    test, so that a flood of plain lines is not looked at line by line."""
    return (dots and _dot_lines(text)) or ("%" in text and _BAR_END.search(text) is not None)


def may_report(kind: str, text: str) -> bool:
    """Whether any line of ``text`` may carry boot progress for ``kind`` (see ``may_glue``)."""
    rules = RULES.get(kind, ())
    return any(literal in text for literal, _, _ in rules) or (kind in DOTS_KINDS and _dot_lines(text))


def unglue(line: str, dots: bool = False) -> list[str]:
    """Split what another writer glued to an unfinished bar into lines of their own.

    A bar is redrawn with \\r and ends its line only when done, and llama.cpp's dots end
    theirs only at 100 %: whatever another process of the engine (vLLM's API server,
    Ollama's serve) writes meanwhile lands on the bar's line, as in
    ``Loading … 40% Completed | 2/5 [00:02<00:03](EngineCore pid=7) INFO …`` or
    ``..........[GIN] … GET "/api/ps"``. ``dots``: the engine prints llama.cpp's dots.
    """
    out: list[str] = []
    while True:
        cut = 0
        if dots and line.startswith("."):
            lead = _LEADING_DOTS.match(line)
            cut = lead.end() if lead else 0
        elif "%" in line and "[" in line:
            bar = _BAR_END.search(line)
            cut = bar.end() if bar and bar.end() < len(line) else 0
        if not cut:
            out.append(line)
            return out
        out.append(line[:cut])
        line = line[cut:]


class Tracker:
    """The boot progress of one engine's output, line by line.

    llama.cpp's dots may arrive in several pieces (another writer's line cut them): they
    add up to the percent until the next "loading model tensors".
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.current: BootProgress | None = None
        self._dots = 0

    @property
    def active(self) -> bool:
        return self.kind in RULES

    def feed(self, line: str) -> None:
        if self.kind in DOTS_KINDS and line.startswith(".") and _DOTS.match(line):
            self._dots = min(100, self._dots + len(line))
            self.current = BootProgress(float(self._dots), TENSORS)
            return
        found = parse(self.kind, line)
        if found is not None:
            if found.stage == TENSORS:
                self._dots = 0
            self.current = found

    def peek(self, unfinished: str) -> None:
        """A line still being written (a bar being redrawn, dots coming): its state counts now."""
        if self.kind in DOTS_KINDS and unfinished.startswith(".") and _DOTS.match(unfinished):
            self.current = BootProgress(float(min(100, self._dots + len(unfinished))), TENSORS)
            return
        self.current = parse(self.kind, unfinished) or self.current
