"""desired_state.yaml's content: the frontend toggle's one-line wish, validated strictly.

Reading and writing the file is ``reconciler.store.desired_file``'s job."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from reconciler.domain.catalog import Catalog
from reconciler.kit import schemas
from reconciler.kit.schemas import InvalidFile


@dataclass(frozen=True)
class Desired:
    """``model=None`` is IDLE: nothing is served and nothing is picked automatically."""

    model: str | None
    generation: int | None = None
    explicit: bool = True  # False: no file, an empty one, or no `model` key (not `model: null`)
    # Provenance, not the wish itself: the machine's boot when it was written (None: not
    # recorded), and the file's mtime (judges a hand-written file without a boot id).
    boot_id: str | None = field(default=None, compare=False)
    written_at: float | None = field(default=None, compare=False)


def before_this_boot(wish: Desired, boot_id: str | None, booted_at: float) -> bool:
    """Whether ``wish`` was written before the machine last booted: by its recorded boot id,
    else (a hand-written file) by its mtime against the boot time."""
    if wish.boot_id is not None and boot_id is not None:
        return wish.boot_id != boot_id
    return wish.written_at is not None and wish.written_at < booted_at


class UnknownModel(InvalidFile):
    def __init__(self, path: Path | str, model: str, known: list[str]) -> None:
        super().__init__(path, f"field 'model': unknown model {model!r}; known: {', '.join(known)}")
        self.model = model
        self.known = known


def parse(document: object, source: Path | str, catalog: Catalog) -> Desired:
    schemas.validate("desired_state", document, source)
    if document is None:
        return Desired(None, explicit=False)
    assert isinstance(document, dict)
    model = document.get("model")
    if model is not None and model not in catalog.engines:
        raise UnknownModel(source, model, catalog.names())
    return Desired(model, document.get("generation"), explicit="model" in document,
                   boot_id=document.get("boot_id"))
