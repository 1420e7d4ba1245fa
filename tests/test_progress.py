"""``mris.progress.EpochClock``: "epoch n/N", each epoch's time and an ETA from the records'
cumulative training seconds."""

from __future__ import annotations

from mris.progress import EpochClock


def test_epoch_lines_count_time_and_estimate_the_rest():
    clock = EpochClock()
    lines = [
        clock.describe("separate-fc", {"epoch": epoch, "epochs": 30, "seconds": 60.0 * epoch})
        for epoch in (1, 2, 3)
    ]
    assert lines[0] == "separate-fc epoch 1/30 (60 s, ETA 29 min)"
    assert lines[2] == "separate-fc epoch 3/30 (60 s, ETA 27 min)"
    last = clock.describe("separate-fc", {"epoch": 30, "epochs": 30, "seconds": 1800.0})
    assert last.startswith("separate-fc epoch 30/30 (") and "ETA" not in last
    # Each name keeps its own clock; a run's last epochs give a short ETA in seconds.
    other = clock.describe("separate-tc", {"epoch": 1, "epochs": 3, "seconds": 20.0})
    assert other == "separate-tc epoch 1/3 (20 s, ETA 40 s)"


def test_a_resumed_run_names_the_epoch_before_it_knows_an_epoch_time():
    clock = EpochClock()
    first = clock.describe("unet", {"epoch": 17, "epochs": 30, "seconds": 1000.0})
    assert first == "unet epoch 17/30"  # cumulative seconds include the epochs before the resume
    second = clock.describe("unet", {"epoch": 18, "epochs": 30, "seconds": 1050.0})
    assert second == "unet epoch 18/30 (50 s, ETA 10 min)"
    assert clock.describe("x", {"epoch": 2}) == "x epoch 2"


def test_captured_output_is_not_wrapped_at_80_columns(monkeypatch):
    from rich.table import Table

    from mris.progress import CAPTURED_WIDTH, make_console

    monkeypatch.delenv("COLUMNS", raising=False)
    console = make_console()  # pytest captures stdout: not a terminal
    assert console.width == CAPTURED_WIDTH
    table = Table("region", "test R@1/5/10/20 % (first visits)", "chance R@20 %", "parity")
    table.add_row("separate-fc", "12.3 / 34.5 / 45.6 / 56.7", "3.7", "1.2e-06")
    with console.capture() as captured:
        console.print(table)
    assert "12.3 / 34.5 / 45.6 / 56.7" in captured.get()  # one line, not wrapped mid-cell
    monkeypatch.setenv("COLUMNS", "100")
    assert make_console().width == 100  # a width the user set wins
