from common.progress import clock, progress_suffix, rate_and_eta


def test_clock():
    assert clock(0) == "0s" and clock(42.4) == "42s" and clock(240) == "4m00s" and clock(3900) == "1h05m"


def test_rate_and_eta_from_the_phase_start():
    # 30 of 200 steps in 60 s: 0.5 step/s, 170 steps left -> 340 s
    assert rate_and_eta(30, 200, 60.0) == "0.50 step/s, 5m40s left"
    # a resumed phase counts only the steps this process did: 10 steps since step 20, in 20 s
    assert rate_and_eta(30, 40, 20.0, first_step=20) == "0.50 step/s, 20s left"
    # slow steps read as seconds per step
    assert rate_and_eta(2, 4, 40.0) == "20 s/step, 40s left"
    assert rate_and_eta(0, 10, 5.0) == "" and rate_and_eta(5, 10, 0.0) == ""


def test_progress_suffix():
    assert progress_suffix(10, 10, 12.3) == "(12s, 0.81 step/s, 0s left)"
    assert progress_suffix(0, 10, 1.0) == "(1s)"
