import math

import pytest

from common.metrics import corpus_rouge_l, distinct_n, mean_and_spread, rouge_l


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat is on the mat") = the cat on the mat = 5 tokens
    p, r = 5 / 6, 5 / 6
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(100 * 2 * p * r / (p + r))
    assert rouge_l("identical words", ["identical words"]) == pytest.approx(100.0)
    assert rouge_l("nothing shared", ["entirely different"]) == 0.0


def test_rouge_l_stems_and_takes_best_reference():
    assert rouge_l("running dogs", ["run dog"]) == pytest.approx(100.0)  # Porter stemming
    assert rouge_l("a b c", ["x y z", "a b c"]) == pytest.approx(100.0)
    assert corpus_rouge_l(["a b", "c"], [["a b"], ["d"]]) == pytest.approx(50.0)


def test_distinct_4_hand_computed():
    # n-grams: (1,2,3,4) (2,3,4,1) (3,4,1,2) | (1,2,3,4) -> 3 unique of 4
    assert distinct_n([[1, 2, 3, 4, 1, 2], [1, 2, 3, 4]], 4) == pytest.approx(75.0)
    assert distinct_n([[1, 2]], 4) == 0.0


def test_mean_and_spread():
    m, s = mean_and_spread([1.0, 3.0])
    assert m == 2.0 and math.isclose(s, 1.0)


def test_exposure_accumulated_error_hand_computed():
    from common.metrics import exposure_accumulated_error

    # student prefixes: position means 1.0, 3.0 -> R(2) = 4; teacher prefixes: 1.0, 1.0 -> 2 eps(2) = 2
    student = [[1.0, 2.0], [1.0, 4.0]]
    teacher = [[0.5, 1.0], [1.5, 1.0]]
    assert exposure_accumulated_error(student, teacher, 2) == pytest.approx(100.0)
    # no exposure bias when errors are the same on both prefix distributions
    assert exposure_accumulated_error(teacher, teacher, 2) == pytest.approx(0.0)
    # shorter samples only count where they have positions: R(3) = 1 + 3 + 5 = 9, 3 eps = 1 + 1 = 2
    assert exposure_accumulated_error(student + [[1.0, 3.0, 5.0]], teacher + [[1.0]], 3) == pytest.approx(350.0)
    with pytest.raises(ValueError):
        exposure_accumulated_error(student, [[0.0, 0.0]], 2)
