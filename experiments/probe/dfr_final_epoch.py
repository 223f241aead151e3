"""DFR on the ERM cell's *last-epoch* model against DFR on its *selected* model: does the grid's
DFR column depend on which ERM epoch it refits?

The reference (PolinaKirichenko/deep_feature_reweighting: `train_classifier.py` saves
`final_checkpoint.pt` after a fixed number of epochs, no selection; `dfr_evaluate_spurious.py`
refits that) refits the final model; the grid refits the epoch ERM's worst-group rule selected,
which at agreement 0.99 (worst-group val 0 at every epoch, first best kept) is epoch 1. The ERM
cells' run folders keep both: `q1_model.pt` (the selected model) and `last.pt` (the last epoch's
training state). First a parity check (the selected model's refit must equal the cell's DFR record),
then the last epoch's refit. Run alone, after the grid:
`uv run python experiments/probe/dfr_final_epoch.py [AGREEMENT ...]` (default 0.99).
Measured figures: results/evidence.md."""

import json
import sys
from pathlib import Path

import torch

from shortcut_study.compare import Cell, CompareOptions, cell_file, load_grid
from shortcut_study.diagnostics import score_refit
from shortcut_study.model import CNN, load_model
from shortcut_study.storage import STUDIES

GRID = "experiments/compare.toml"
SHOWN = ("acc", "aligned_acc", "conflicting_acc", "gap", "worst_group_acc", "worst_class_acc")


def erm_run_dirs(options: CompareOptions) -> dict[float, Path]:
    """agreement -> the run folder of the grid's ERM cell (the last one that finished)."""
    found: dict[float, Path] = {}
    for cfg_path in sorted((STUDIES / options.study).glob("cell-*/config.json")):
        cfg = json.loads(cfg_path.read_text())
        if (cfg["train"]["method"] == "erm" and cfg["augment"]["digit_shuffle_p"] == 0
                and (cfg_path.parent / "last.pt").is_file()):
            found[cfg["build"]["train_agreement"]] = cfg_path.parent
    return found


def dataset_of(agreement: float) -> Path:
    """The grid's dataset for `agreement` (16 px) in `data/` (the records of the first part name
    the folder of an older cache key; the content is the same build)."""
    for meta in Path("data").glob("strength-*.json"):
        tree = json.loads(meta.read_text())
        if tree["build"]["train_agreement"] == agreement and tree["geometry"]["digit_size"] == 16:
            return meta.with_suffix("")
    raise SystemExit(f"no grid dataset for agreement {agreement:g} in data/ — run `make compare` first")


def last_epoch_model(run: Path) -> tuple[CNN, int]:
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    model = CNN()
    model.load_state_dict(state["model"])
    return model, state["epoch"]


def row(label: str, scores: dict[str, float]) -> str:
    return f"| {label} | " + " | ".join(f"{scores[k]:.2f}" for k in SHOWN) + " |"


def main() -> None:
    torch.set_num_threads(1)
    agreements = [float(a) for a in sys.argv[1:]] or [0.99]
    print(torch.backends.cpu.get_cpu_capability())
    print("| cell | " + " | ".join(SHOWN) + " |\n|---|" + "---|" * len(SHOWN))
    for seed in (0, 1, 2):
        options = CompareOptions(load_grid(GRID, [f"seeds={seed}"]), cifar="", mnist="")
        runs = erm_run_dirs(options)
        for agreement in agreements:
            cell = Cell("dfr", agreement, 16, seed)
            record = json.loads(cell_file(options.out, cell).read_text())
            cfg = options.grid.cell_config(cell)
            cfg.train.threads = 1  # a grid worker's
            data = dataset_of(agreement)
            selected = score_refit(load_model(runs[agreement] / "q1_model.pt"), cfg, data)
            parity = all(abs(selected[k] - record["test"][k]) < 1e-9 for k in SHOWN)
            last, last_epoch = last_epoch_model(runs[agreement])
            print(row(f"a={agreement:g} seed {seed}: DFR record (epoch {record['epoch']})", record["test"]))
            print(row(f"… selected model refit again (parity {'ok' if parity else 'DIFFERS'})", selected))
            print(row(f"… last epoch ({last_epoch}) refit", score_refit(last, cfg, data)), flush=True)


if __name__ == "__main__":
    main()
