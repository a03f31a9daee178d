"""The models a server trains and serves, by the names its operator gave them.

A remote tenant names a model (``config.model.name``), never a path: the
operator registers each one at start (``tensafe serve --model NAME=PATH``),
so a request can reach no file the operator did not choose, and a model that
is not on local disk (a hub id) is refused at start rather than fetched while
a request waits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tensafe.api import NAME_PATTERN, ModelInfo, SessionConfig
from tensafe.config import ModelConfig, RunConfig
from tensafe.errors import NotFound, UsageError

#: The name of the ML backend's embedded model, served when the operator registers none.
EMBEDDED = "embedded"


@dataclass(frozen=True)
class ModelRegistry:
    """Model names to local directories (None: the backend's embedded model); the first is the default."""

    paths: dict[str, Path | None]

    @classmethod
    def embedded(cls) -> ModelRegistry:
        return cls({EMBEDDED: None})

    @classmethod
    def parse(cls, specs: Iterable[str]) -> ModelRegistry:
        """``NAME=PATH`` options as ``tensafe serve --model`` takes them; none at all = the embedded model."""
        paths: dict[str, Path | None] = {}
        for spec in specs:
            name, sep, path = spec.partition("=")
            if not sep or not path:
                raise UsageError(f"--model {spec!r}: expected NAME=PATH, e.g. --model llama-8b=/models/llama-8b")
            if not re.fullmatch(NAME_PATTERN, name):
                raise UsageError(f"--model {spec!r}: a name is letters, digits, '.', '_' or '-' (at most 64)")
            if name in paths:
                raise UsageError(f"--model {name!r} is given twice")
            directory = Path(path).expanduser()
            if not directory.is_dir():
                raise UsageError(
                    f"--model {name}: {directory} is not a directory; a server serves models from local disk "
                    "(download hub models first)"
                )
            paths[name] = directory.resolve()
        return cls(paths) if paths else cls.embedded()

    @property
    def default(self) -> str:
        return next(iter(self.paths))

    def listing(self) -> list[ModelInfo]:
        return [ModelInfo(name=name, default=name == self.default) for name in self.paths]

    def resolve(self, name: str | None) -> Path | None:
        """The directory of the model ``name`` (None = the default); an unknown name is a 404."""
        name = self.default if name is None else name
        if name not in self.paths:
            raise NotFound(f"no model {name!r} on this server (GET /api/v1/models lists them)")
        return self.paths[name]

    def run_config(self, config: SessionConfig, scratch: Path) -> RunConfig:
        """The engine's config for a remote session: the registered model, output in the server's scratch."""
        path = self.resolve(config.model.name)
        model = ModelConfig(
            path=None if path is None else str(path), dtype=config.model.dtype, max_seq_len=config.model.max_seq_len
        )
        return RunConfig(
            backend=config.backend,
            output_dir=scratch,
            model=model,
            lora=config.lora,
            dp=config.dp,
            optimizer=config.optimizer,
            training=config.training,
            sampling=config.sampling,
        )
