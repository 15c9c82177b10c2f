"""What the protocol hides and what it detects."""

import math

import numpy as np
import pytest

from fedlora.privacy.secagg import (
    ProtocolViolation,
    SecAggClient,
    SecAggConfig,
    SecAggConfigError,
    SecAggServer,
    ShareDecryptionError,
    ShareVerificationError,
    keys,
    messages as m,
    run_in_memory,
    shamir,
)
from fedlora.privacy.secagg.encoding import unpack
from fedlora.privacy.secagg.prg import expand_into

IDS = [11, 22, 33, 44, 55]


def _vectors(ids=IDS, length=1000, seed=0):
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-1, 1, length).astype(np.float32) for i in ids}


def _chi2_stat(buckets, k):
    counts = np.bincount(buckets, minlength=k)
    expected = buckets.size / k
    return float(((counts - expected) ** 2 / expected).sum())


def _chi2_critical(dof, z=4.753):
    """Wilson-Hilferty upper quantile of chi-square; z = 4.753 is p = 1e-6."""
    a = 2 / (9 * dof)
    return dof * (1 - a + z * math.sqrt(a)) ** 3


def _capture_uploads(log):
    def tamper(stage, node, direction, payload):
        if stage == m.MASKED_INPUT and direction == "reply":
            log[node] = payload[m.MASKED_VECTOR].copy()
        return payload

    return tamper


@pytest.mark.parametrize("bits,bytes_per_param", [(None, 4), (10, None)])
def test_masked_upload_is_uniform_and_fresh_every_round(bits, bytes_per_param):
    config = SecAggConfig(bits=bits, bytes_per_param=bytes_per_param or 4)
    q = config.resolve(3).quantizer
    m_bits = q.modulus_bits
    vectors = {i: np.full(200_000, 0.5, dtype=np.float32) for i in IDS[:3]}  # worst case: constant input
    first, second = {}, {}
    run_in_memory(vectors, config=config, tamper=_capture_uploads(first))
    run_in_memory(vectors, config=config, tamper=_capture_uploads(second))
    upload = unpack(first[11], m_bits).astype(np.int64)
    assert upload.max() < 2**m_bits
    critical = _chi2_critical(255)
    for shift in (m_bits - 8, 0, (m_bits - 8) // 2):  # high, low and middle 8 bits
        assert _chi2_stat((upload >> shift) & 0xFF, 256) < critical
    # The same input in the next round is masked afresh.
    assert np.mean(upload == unpack(second[11], m_bits)) < 0.01
    # Control: the unmasked encoding fails the same test, so the test can fail.
    plain = q.quantize(vectors[11]).astype(np.int64)
    assert _chi2_stat((plain >> (m_bits - 8)) & 0xFF, 256) > critical


def _manual_round(vectors, threshold):
    """Run to the unmask requests, keeping each client's state after every stage."""
    server = SecAggServer(list(vectors), SecAggConfig(threshold=threshold))
    clients = {i: SecAggClient(i) for i in vectors}
    reqs = server.setup_requests()
    reqs = server.share_keys_requests({i: clients[i].advertise_keys(r) for i, r in reqs.items()})
    reps = {i: clients[i].share_keys(r) for i, r in reqs.items()}
    after_keys = {i: c.state_dict() for i, c in clients.items()}  # still holds its own secrets
    reqs = server.masked_input_requests(reps)
    uploads = {i: clients[i].masked_input(r, vectors[i]) for i, r in reqs.items()}
    unmask_reqs = server.unmask_requests(uploads)
    return server, clients, after_keys, uploads, unmask_reqs


def _unmask_with(target, seed, mask_sk, server, after_keys, upload):
    """What colluders would compute from a guessed seed and mask key of ``target``."""
    q = server.quantizer
    total = unpack(upload[m.MASKED_VECTOR], q.modulus_bits)
    scratch = np.empty_like(total)
    total -= expand_into(keys.self_mask_seed(seed, server.session_id, target), scratch)
    state = after_keys[target]
    for j, pk in zip(state["peer_ids"], state["peer_mask_pks"]):
        shared = keys.agree(mask_sk, pk)
        expand_into(keys.pairwise_mask_seed(shared, server.session_id, target, j), scratch)
        if target < j:
            total -= scratch
        else:
            total += scratch
    total &= total.dtype.type(q.modulus_mask)
    return q.decode_sum(total)


def test_fewer_than_t_colluders_cannot_unmask_a_client():
    t = 3
    vectors = _vectors()
    server, clients, after_keys, uploads, _ = _manual_round(vectors, threshold=t)
    target, colluders = 11, [22, 33, 44]
    truth_seed, truth_sk = after_keys[target]["seed"], after_keys[target]["mask_sk"]
    mask_pk = keys.public_from_private(truth_sk)

    def shares_of(holders):
        seed_pts, key_pts = [], []
        for h in holders:
            st = clients[h].state_dict()
            k = st["partner_ids"].index(target)
            seed_pts.append((shamir.share_x(h), shamir.decode_share(st["partner_seed_shares"][k])))
            key_pts.append((shamir.share_x(h), shamir.decode_share(st["partner_key_shares"][k])))
        return seed_pts, key_pts

    # t - 1 colluders (plus everything the server saw) interpolate the wrong secrets...
    seed_pts, key_pts = shares_of(colluders[: t - 1])
    guess_seed = (shamir.interpolate_at(seed_pts, 0) % 2**256).to_bytes(32, "big")
    guess_sk = (shamir.interpolate_at(key_pts, 0) % 2**256).to_bytes(32, "big")
    assert guess_seed != truth_seed and guess_sk != truth_sk
    assert keys.commit(guess_seed, server.session_id, target) != keys.commit(truth_seed, server.session_id, target)
    assert keys.public_from_private(guess_sk) != mask_pk
    # ...and unmasking with them yields garbage, not the client's vector.
    garbage = _unmask_with(target, guess_seed, guess_sk, server, after_keys, uploads[target])
    assert np.mean(np.abs(garbage - vectors[target]) < 0.01) < 0.01

    # Control: with t colluders the same attack works, so the threshold is what stops it.
    seed_pts, key_pts = shares_of(colluders[:t])
    seed = shamir.interpolate_at(seed_pts, 0).to_bytes(32, "big")
    mask_sk = shamir.interpolate_at(key_pts, 0).to_bytes(32, "big")
    assert (seed, mask_sk) == (truth_seed, truth_sk)
    exposed = _unmask_with(target, seed, mask_sk, server, after_keys, uploads[target])
    assert np.abs(exposed - vectors[target]).max() <= server.quantizer.step


def test_tampered_share_ciphertext_is_detected_by_the_receiver():
    def flip(stage, node, direction, payload):
        if stage == m.MASKED_INPUT and direction == "request" and node == 33:
            ct = bytearray(payload[m.CIPHERTEXTS][0])
            ct[-1] ^= 1
            payload[m.CIPHERTEXTS][0] = bytes(ct)
        return payload

    with pytest.raises(ShareDecryptionError) as err:
        run_in_memory(_vectors(), threshold=3, tamper=flip)
    assert (err.value.sender, err.value.receiver) == (11, 33)


def test_misrouted_share_ciphertext_is_detected():
    def swap(stage, node, direction, payload):
        if stage == m.MASKED_INPUT and direction == "request" and node == 33:
            cts = payload[m.CIPHERTEXTS]
            cts[0], cts[1] = cts[1], cts[0]  # AAD binds sender and receiver
        return payload

    with pytest.raises(ShareDecryptionError):
        run_in_memory(_vectors(), threshold=3, tamper=swap)


def _alter_share(holder, ids_key, shares_key, delta=1):
    def tamper(stage, node, direction, payload):
        if stage == m.UNMASK and direction == "reply" and node == holder:
            y = shamir.decode_share(payload[shares_key][0])
            payload[shares_key][0] = shamir.encode_share((y + delta) % shamir.PRIME)
        return payload

    return tamper


def _shift_secret_by_one(holder, holders):
    """Share change that moves the rebuilt secret by exactly +1 (stays a valid 32-byte value)."""
    x = shamir.share_x(holder)
    lam = 1
    for h in holders:
        if h != holder:
            xj = shamir.share_x(h)
            lam = lam * xj * pow(xj - x, -1, shamir.PRIME) % shamir.PRIME
    return pow(lam, -1, shamir.PRIME)


@pytest.mark.parametrize("smart", [False, True])
def test_share_altered_after_decryption_fails_the_commitment_check(smart):
    # Two clients vanish after uploading: each self-mask seed has exactly t = 3 shares,
    # from 11, 22 and 33. A naive change gives an out-of-range value; a smart one gives
    # seed + 1, which only the commitment can tell apart.
    delta = _shift_secret_by_one(22, [11, 22, 33]) if smart else 1
    with pytest.raises(ShareVerificationError, match="commitment") as err:
        run_in_memory(
            _vectors(), threshold=3, dropouts_after_masking=[44, 55],
            tamper=_alter_share(22, m.SEED_SHARE_IDS, m.SEED_SHARES, delta),
        )
    assert err.value.client_id == 11 and 22 in err.value.holders


def test_altered_extra_share_is_caught_by_the_consistency_check():
    # All five answer: five shares per seed, t = 3; holder 55's share is not among the first t.
    with pytest.raises(ShareVerificationError, match="inconsistent") as err:
        run_in_memory(_vectors(), threshold=3, tamper=_alter_share(55, m.SEED_SHARE_IDS, m.SEED_SHARES))
    assert err.value.client_id == 11 and err.value.holders == (55,)


def test_altered_mask_key_share_of_a_dropped_client_is_detected():
    # 55 drops after sharing; 11, 22 and 33 answer (44 vanishes too): exactly t shares.
    delta = _shift_secret_by_one(11, [11, 22, 33])
    with pytest.raises(ShareVerificationError, match="advertised public key") as err:
        run_in_memory(
            _vectors(), threshold=3, dropouts_after_keys=[55], dropouts_after_masking=[44],
            tamper=_alter_share(11, m.KEY_SHARE_IDS, m.KEY_SHARES, delta),
        )
    assert err.value.client_id == 55


def test_client_refuses_both_shares_of_one_neighbour():
    def greedy(stage, node, direction, payload):
        if stage == m.UNMASK and direction == "request" and node == 11:
            payload[m.DROPPED_IDS] = payload[m.DROPPED_IDS] + [22]  # 22 is also a survivor
        return payload

    with pytest.raises(ProtocolViolation, match="both"):
        run_in_memory(_vectors(), threshold=3, tamper=greedy)


def test_client_answers_unmask_once_and_in_order():
    server, clients, _, _, unmask_reqs = _manual_round(_vectors(), threshold=3)
    client = SecAggClient.from_state_dict(clients[11].state_dict())
    client.unmask(unmask_reqs[11])
    # A second request (say, with a different dropout list) is refused.
    second = dict(unmask_reqs[11], **{m.SURVIVOR_IDS: [11, 22, 33], m.DROPPED_IDS: [44, 55]})
    with pytest.raises(ProtocolViolation, match="already answered"):
        client.unmask(second)
    with pytest.raises(ProtocolViolation, match="out of order"):
        client.share_keys({m.STAGE: m.SHARE_KEYS, m.SESSION_ID: server.session_id})
    with pytest.raises(ProtocolViolation, match="another session"):
        clients[22].unmask(dict(unmask_reqs[22], **{m.SESSION_ID: b"x" * 32}))


def test_client_rejects_unsafe_setup():
    server = SecAggServer(IDS, SecAggConfig(threshold=3))
    request = server.setup_requests()[11]
    for key, bad in [(m.THRESHOLD, 1), (m.PARTICIPANTS, [11, 22]), (m.MODULUS_BITS, 16), (m.PARTICIPANTS, [1, 2, 3])]:
        with pytest.raises(ProtocolViolation):
            SecAggClient(11).advertise_keys(dict(request, **{key: bad}))
    client = SecAggClient(11)
    client.advertise_keys(request)
    with pytest.raises(ProtocolViolation, match="replayed"):
        client.advertise_keys(request)


def _inconsistent_dropout_lists(vectors, threshold, target=11):
    """A malicious coordinator's unmask stage: it tells the target and some sites "the target
    survived" (they reveal its self-mask shares) and the others "it dropped" (they reveal its mask-key
    shares), then rebuilds both secrets and strips every mask from the target's upload."""
    config = SecAggConfig(threshold=threshold, allow_weak_threshold=True)
    server = SecAggServer(list(vectors), config)
    clients = {i: SecAggClient(i) for i in vectors}
    reqs = server.setup_requests()
    reqs = server.share_keys_requests({i: clients[i].advertise_keys(r, True) for i, r in reqs.items()})
    reps = {i: clients[i].share_keys(r) for i, r in reqs.items()}
    after_keys = {i: c.state_dict() for i, c in clients.items()}
    reqs = server.masked_input_requests(reps)
    uploads = {i: clients[i].masked_input(r, vectors[i]) for i, r in reqs.items()}
    honest = server.unmask_requests(uploads)
    others = [i for i in vectors if i != target]
    told_survived, told_dropped = others[:threshold - 1], others[threshold - 1:]  # the target answers too
    seed_pts, key_pts = [], []
    for i in [target, *told_survived]:
        reply = clients[i].unmask(dict(honest[i], **{m.SURVIVOR_IDS: list(vectors), m.DROPPED_IDS: []}))
        share = reply[m.SEED_SHARES][reply[m.SEED_SHARE_IDS].index(target)]
        seed_pts.append((shamir.share_x(i), shamir.decode_share(share)))
    for i in told_dropped:
        reply = clients[i].unmask(dict(honest[i], **{m.SURVIVOR_IDS: others, m.DROPPED_IDS: [target]}))
        key_pts.append((shamir.share_x(i), shamir.decode_share(reply[m.KEY_SHARES][0])))
    seed = (shamir.interpolate_at(seed_pts[:threshold], 0) % 2**256).to_bytes(32, "big")
    mask_sk = (shamir.interpolate_at(key_pts[:threshold], 0) % 2**256).to_bytes(32, "big")
    return _unmask_with(target, seed, mask_sk, server, after_keys, uploads[target]), server


def test_a_threshold_a_coordinator_can_defeat_with_inconsistent_dropout_lists_is_refused():
    """The audit: with t = 3 of 6 a coordinator that sent different dropout lists to different
    sites recovered one site's update alone."""
    vectors = _vectors([11, 22, 33, 44, 55, 66])
    exposed, server = _inconsistent_dropout_lists(vectors, threshold=3)  # the attack, replayed
    assert np.abs(exposed - vectors[11]).max() <= server.quantizer.step
    # Now the protocol refuses that threshold for 6 sites, and so does every site, whatever the server asks...
    with pytest.raises(SecAggConfigError, match="dropout lists"):
        SecAggConfig(threshold=3).resolve(6)
    request = SecAggServer(list(vectors), SecAggConfig(threshold=3, allow_weak_threshold=True)).setup_requests()[22]
    with pytest.raises(ProtocolViolation, match="dropout lists"):
        SecAggClient(22).advertise_keys(request)
    # ...and at the smallest accepted threshold the same attack gets garbage.
    garbage, _ = _inconsistent_dropout_lists(vectors, threshold=4)
    assert np.mean(np.abs(garbage - vectors[11]) < 0.01) < 0.01
