"""A run folder, the one place that knows its files.

    q1_model.pt   the selected model: a plain state_dict with the course's key names
    config.json   the configuration that model was trained with (and the model's SHA-256)
    last.pt       everything `--resume` needs (weights, optimizer, schedule, method state, RNG, history)
    history.csv   one row of metrics per epoch

`config.json` is written only together with `q1_model.pt`, so a run that fails before saving a
model leaves the previous pair untouched, and the recorded hash catches a pair torn apart by a
crash between the two writes. Every load is `weights_only=True`: a shared run folder cannot run code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from .config import Config
from .errors import UserError, atomic_path, read_json, write_text_atomic
from .model import CNN, load_model, plain_state_dict

MODEL_FILE = "q1_model.pt"
CONFIG_FILE = "config.json"
LAST_FILE = "last.pt"
HISTORY_FILE = "history.csv"
_HASH_KEY = "_model_sha256"  # beside the config sections in config.json


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Run:
    dir: Path

    @classmethod
    def of(cls, path: str | Path) -> Run:
        """The run holding `path`: a run folder, or a checkpoint file inside one."""
        path = Path(path)
        return cls(path.parent if path.suffix == ".pt" else path)

    @property
    def model_path(self) -> Path:
        return self.dir / MODEL_FILE

    @property
    def config_path(self) -> Path:
        return self.dir / CONFIG_FILE

    @property
    def last_path(self) -> Path:
        return self.dir / LAST_FILE

    @property
    def history_path(self) -> Path:
        return self.dir / HISTORY_FILE

    def holds_a_run(self) -> bool:
        """Any file a training run writes is here (an earlier run, whole or not)."""
        return any((self.dir / name).exists() for name in (MODEL_FILE, CONFIG_FILE, LAST_FILE, HISTORY_FILE))

    # ---- the selected model and its config, written and read as a pair ----
    def save_model(self, model: nn.Module, cfg: Config) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.model_path) as tmp:
            torch.save(plain_state_dict(model), tmp)
            digest = _sha256(tmp)
            write_text_atomic(self.config_path, json.dumps({**cfg.to_dict(), _HASH_KEY: digest}, indent=2) + "\n")

    def config(self, checkpoint: Path | None = None) -> Config:
        """The config beside `checkpoint` (default: the run's model); the defaults for a bare
        checkpoint with no config.json."""
        path = self.config_path
        if not path.is_file():
            return Config()
        tree = read_json(path, "run config", "remove it or retrain the run")
        digest = tree.pop(_HASH_KEY, None)
        model = checkpoint or self.model_path
        if digest and model.is_file() and _sha256(model) != digest:
            raise UserError(f"{path} does not belong to {model} (written by another training, or torn by a "
                            "crash) — retrain the run or remove config.json to use the defaults")
        try:
            return Config.from_dict(tree)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None

    def load(self, device: torch.device | str = "cpu", checkpoint: str | Path | None = None) -> tuple[CNN, Config]:
        """The model (from `checkpoint`, default the run's q1_model.pt) and the config it was trained with."""
        ckpt = Path(checkpoint) if checkpoint else self.model_path
        model = load_model(ckpt, device)
        return model, self.config(ckpt)

    # ---- resume state ----
    def save_last(self, state: dict[str, Any]) -> None:
        with atomic_path(self.last_path) as tmp:
            torch.save(state, tmp)

    def load_last(self) -> dict[str, Any]:
        path = self.last_path
        if not path.is_file():
            raise UserError(f"no {LAST_FILE} in {self.dir} to resume from — drop --resume to start afresh")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt, foreign, or a pickle that would run code
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
            raise UserError(f"cannot resume from {path} ({type(exc).__name__}: {first}) — delete it to "
                            "start afresh") from None
        problem = _state_problem(state)
        if problem:
            raise UserError(f"cannot resume from {path}: not a shortcut-study training state ({problem}) — delete it "
                            "to start afresh")
        return state

    def write_history(self, history: list[dict[str, float]]) -> None:
        with atomic_path(self.history_path) as tmp:
            pd.DataFrame(history).to_csv(tmp, index=False)


# What `last.pt` must hold, and of which type, before anything reads it.
_STATE_TYPES = {"model": dict, "optimizer": dict, "scheduler": dict, "rng": torch.Tensor, "history": list,
                "epoch": int, "config": dict, "method": dict, "best_score": (int, float), "best_epoch": int}


def _state_problem(state: Any) -> str:
    """What is wrong with a loaded training state ('' when nothing)."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a table"
    for key, kind in _STATE_TYPES.items():
        if key not in state:
            return f"no {key!r}"
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            return f"{key!r} is a {type(state[key]).__name__}"
    if not isinstance(state["method"].get("name"), str) or not isinstance(state["method"].get("state", {}), dict):
        return "'method' lacks its name or state"
    if not all(isinstance(h, dict) for h in state["history"]):
        return "'history' holds something other than epoch records"
    if not 0 <= state["epoch"] <= 10**6 or not 0 <= state["best_epoch"] <= state["epoch"]:
        return "its epoch counters are out of range"
    return ""
