"""Built-up pretraining is a callback: it runs before a fresh fit without weights, and only then."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import popcorn.tasks.pretraining as pretraining
from popcorn.tasks.pretraining import BuiltUpPretraining, PretrainBuiltUp


class _Task:
    def __init__(self, weights: str | None) -> None:
        self.hparams = {"builtup_weights": weights}
        self.loaded: list[str] = []

    def load_builtup_weights(self, path: str) -> None:
        self.loaded.append(path)


@pytest.mark.parametrize(("weights", "ckpt", "expected"), [
    (None, None, ["export.pt"]),          # fresh fit without weights: pretrain, then load
    ("given.pt", None, []),               # weights given: nothing
    (None, "last.ckpt", []),              # resume: the checkpoint holds the extractor
])
def test_pretraining_runs_only_for_a_fresh_fit_without_weights(
    monkeypatch: pytest.MonkeyPatch, weights: str | None, ckpt: str | None, expected: list[str]
) -> None:
    calls: list[BuiltUpPretraining] = []

    def fake_pretrain(datamodule, settings, trainer):  # noqa: ANN001, ANN202
        calls.append(settings)
        return Path("export.pt")

    monkeypatch.setattr(pretraining, "pretrain_builtup", fake_pretrain)
    settings = BuiltUpPretraining(max_epochs=3)
    trainer = SimpleNamespace(ckpt_path=ckpt, datamodule=object(), world_size=1)
    task = _Task(weights)
    PretrainBuiltUp(settings).on_fit_start(trainer, task)
    assert task.loaded == expected
    assert calls == ([settings] if expected else [])
