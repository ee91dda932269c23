import numpy as np
import pytest

from common.mixture import STUDENT, TEACHER, draw_owners, run_length


def test_run_length_is_the_run_of_equal_owners_from_there():
    owners = np.array([0, 0, 1, 1, 1, 0], dtype=np.int8)
    assert [run_length(owners, t) for t in range(6)] == [2, 1, 3, 2, 1, 1]
    rng = np.random.default_rng(3)
    for alpha in [0.0, 0.2, 0.5, 1.0]:
        owners = draw_owners(40, alpha, rng)
        for t in range(40):
            n = run_length(owners, t)
            assert (owners[t : t + n] == owners[t]).all() and (t + n == 40 or owners[t + n] != owners[t])


def test_owner_is_bernoulli_alpha_per_position():
    rng = np.random.default_rng(1)
    alpha, n, length = 0.2, 20000, 8
    owners = np.stack([draw_owners(length, alpha, rng) for _ in range(n)])
    freq = (owners == TEACHER).mean(axis=0)
    # 4-sigma band per position: sd = sqrt(a(1-a)/n) ~ 0.0028
    assert np.all(np.abs(freq - alpha) < 4 * np.sqrt(alpha * (1 - alpha) / n))
    # independence of neighbours: P(both teacher) = alpha^2
    both = ((owners[:, :-1] == TEACHER) & (owners[:, 1:] == TEACHER)).mean()
    assert abs(both - alpha**2) < 4 * np.sqrt(alpha**2 * (1 - alpha**2) / (n * (length - 1)))


@pytest.mark.parametrize("alpha,owner", [(0.0, STUDENT), (1.0, TEACHER)])
def test_extreme_alphas_give_one_owner(alpha, owner):
    assert (draw_owners(64, alpha, np.random.default_rng(0)) == owner).all()


def test_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        draw_owners(4, 1.2, np.random.default_rng(0))
