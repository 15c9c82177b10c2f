"""Shamir sharing over GF(2^521 - 1): round trips, secrecy below threshold, tamper checks."""

import itertools
import secrets

import pytest

from fedlora.privacy.secagg import shamir


def _shares(secret, t, ids):
    xs = [shamir.share_x(i) for i in ids]
    return list(zip(xs, shamir.split(secret, t, xs)))


@pytest.mark.parametrize("t,n", [(2, 3), (3, 5), (4, 4), (5, 9)])
def test_any_t_of_n_shares_rebuild_the_secret(t, n):
    secret = int.from_bytes(secrets.token_bytes(32), "big")
    points = _shares(secret, t, [10 * i + 7 for i in range(n)])
    for subset in itertools.combinations(points, t):
        assert shamir.reconstruct(list(subset), t) == secret
    assert shamir.reconstruct(points, t) == secret  # extra shares are checked, not needed


def test_t_minus_1_shares_are_consistent_with_every_secret():
    t, secret = 4, int.from_bytes(secrets.token_bytes(32), "big")
    points = _shares(secret, t, [1, 2, 3, 4, 5])
    known = points[: t - 1]
    # Interpolating t-1 shares does not give the secret...
    assert shamir.interpolate_at(known, 0) != secret
    # ...and for any candidate secret a degree-(t-1) polynomial fits those shares:
    # they carry no information about which secret is the real one.
    for candidate in (0, 1, secret + 1, int.from_bytes(secrets.token_bytes(32), "big")):
        curve = [(0, candidate), *known]
        assert shamir.reconstruct(curve + [(points[t][0], shamir.interpolate_at(curve, points[t][0]))], t) == candidate


def test_inconsistent_extra_share_is_flagged():
    points = _shares(123456789, 3, [1, 2, 3, 4, 5])
    x, y = points[4]
    points[4] = (x, (y + 1) % shamir.PRIME)
    assert shamir.find_inconsistent(points, 3) == [4]
    with pytest.raises(shamir.InconsistentShares):
        shamir.reconstruct(points, 3)


def test_too_few_shares_and_bad_parameters_raise():
    points = _shares(5, 3, [1, 2, 3])
    with pytest.raises(ValueError):
        shamir.reconstruct(points[:2], 3)
    with pytest.raises(ValueError):
        shamir.split(5, 3, [1, 2])
    with pytest.raises(ValueError):
        shamir.split(5, 2, [1, 1, 2])
    with pytest.raises(ValueError):
        shamir.split(shamir.PRIME, 2, [1, 2])


def test_share_encoding_round_trip_and_64_bit_ids():
    y = shamir.PRIME - 1
    assert len(shamir.encode_share(y)) == shamir.SHARE_BYTES == 66
    assert shamir.decode_share(shamir.encode_share(y)) == y
    with pytest.raises(ValueError):
        shamir.decode_share(b"\xff" * 66)  # >= PRIME
    with pytest.raises(ValueError):
        shamir.decode_share(b"\x00" * 65)
    xs = {shamir.share_x(i) for i in (0, 1, 2**63 - 1, 2**64 - 1, -(2**63))}
    assert len(xs) == 5 and 0 not in xs
    with pytest.raises(ValueError):
        shamir.share_x(2**64)
