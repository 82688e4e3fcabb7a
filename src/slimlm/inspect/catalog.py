"""Built-in catalog of well-known models, written from their public config.json values.

One JSON file per model in ``inspect/catalog/``: config keys, name label, published counts (with sources),
and for distilled models the student base and teacher. Lookup ignores case and knows aliases (Ollama tags
such as ``deepseek-r1:14b``, Hub repo ids); an unknown name suggests the closest known ones.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from slimlm.errors import SlimlmError


@dataclass(frozen=True)
class CatalogEntry:
    """One well-known model: its config (as published) and what its name and card say."""

    key: str
    name: str
    repo: str
    label: str
    family: str
    architecture: str
    description: str
    config: dict[str, Any]
    published: dict[str, Any]
    aliases: tuple[str, ...] = ()
    student_base: str | None = None
    teacher: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-")


@lru_cache(maxsize=1)
def _load() -> tuple[dict[str, CatalogEntry], dict[str, str]]:
    entries: dict[str, CatalogEntry] = {}
    index: dict[str, str] = {}
    folder = resources.files("slimlm.inspect").joinpath("catalog")
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if not item.name.endswith(".json"):
            continue
        data = json.loads(item.read_text(encoding="utf-8"))
        key = item.name[: -len(".json")]
        known = {"name", "repo", "label", "family", "architecture", "description", "config", "published",
                 "aliases", "student_base", "teacher"}
        entry = CatalogEntry(
            key=key, name=data["name"], repo=data["repo"], label=data["label"], family=data["family"],
            architecture=data["architecture"], description=data["description"], config=data["config"],
            published=data["published"], aliases=tuple(data.get("aliases", ())),
            student_base=data.get("student_base"), teacher=data.get("teacher"),
            extra={k: v for k, v in data.items() if k not in known},
        )
        entries[key] = entry
        for alias in (key, entry.name, entry.repo, *entry.aliases):
            index[_normalize(alias)] = key
    return entries, index


def entries() -> list[CatalogEntry]:
    """Every catalog entry, in file-name order."""
    return list(_load()[0].values())


def find(name: str) -> CatalogEntry | None:
    """The entry for a name, alias, Ollama tag or repo id (any case), or None."""
    loaded, index = _load()
    key = index.get(_normalize(name))
    return loaded[key] if key else None


def lookup(name: str) -> CatalogEntry:
    """Like find, but an unknown name raises SlimlmError naming the closest catalog names."""
    entry = find(name)
    if entry is not None:
        return entry
    loaded, index = _load()
    close = difflib.get_close_matches(_normalize(name), list(index), n=3, cutoff=0.5)
    names = list(dict.fromkeys(loaded[index[c]].name for c in close))
    hint = f"; did you mean {', '.join(names)}?" if names else f"; known: {', '.join(e.name for e in loaded.values())}"
    raise SlimlmError(f"{name!r} is neither an existing path nor a model in the built-in catalog{hint}")
