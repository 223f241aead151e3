"""A part's line: wall time counts only while its runs ran, so a part resumed in a later sitting
does not count the hours between its sittings; every commit it ran at is named."""

from shortcut_study.parts import part_lines


def _record(start: float, end: float, commit: str) -> dict:
    return {"part": "p", "machine": "a test machine", "train_seconds": end - start, "started": start, "ended": end,
            "commit": commit}


def test_a_part_in_two_sittings_counts_its_runs_not_the_break():
    sitting1 = [_record(0, 120, "abc"), _record(60, 180, "abc")]  # two workers, overlapping
    sitting2 = [_record(3600, 3660, "def")]  # resumed an hour later at another commit
    (line,) = part_lines(sitting1 + sitting2, "cells")
    assert line == ("- `p` (3 cells, commit abc, def, 4.0 min of wall time while its runs ran, "
                    "5.0 min of training): a test machine")


def test_no_records_no_parts():
    assert part_lines([], "cells") == ["- none yet"]


def test_records_of_one_training_run_count_its_training_once():
    """Rules sharing a seed run and a refit of its model each leave a record naming the run."""
    shared = [{**_record(0, 120, "abc"), "training": "erm worst_group+worst_class seed 0"} for _ in range(2)]
    refit = {**_record(120, 130, "abc"), "train_seconds": 0.0, "training": "erm worst_group+worst_class seed 0"}
    for records in ([refit, *shared, _record(0, 60, "abc")], [*shared, refit, _record(0, 60, "abc")]):
        (line,) = part_lines(records, "seed runs")
        assert "(4 seed runs, commit abc, 2.2 min of wall time while its runs ran, 3.0 min of training)" in line
