"""Progress reports as plain lines (stderr not a terminal): rate and ETA from this run's steps."""
import fastsae.progress as progress


def test_log_lines_report_the_rate_and_eta_of_this_run(monkeypatch, capsys):
    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    bar = progress.LogLines(total=100, desc="train SAE", unit="step", initial=40)  # resumed at step 40
    bar.set_postfix(fvu="0.1234")
    now[0] += 31.0
    bar.update(10)  # 10 steps in 31 s, 50 left
    line = capsys.readouterr().err.strip()
    assert line == "train SAE: 50/100 (50%) step, 0.3 step/s, ETA 0:02:35 fvu=0.1234"
    now[0] += 1.0
    bar.update(50)
    bar.close()
    assert capsys.readouterr().err.strip() == "train SAE: 100/100 (100%) step, 1.9 step/s fvu=0.1234"
