import multiprocessing
import stat

import pytest

from fedlora.client.private_files import secret, write_private


def _secret(path):
    return secret(path).hex()


def test_processes_starting_together_agree_on_one_whole_secret(tmp_path):
    path = tmp_path / "key"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        made = pool.map(_secret, [path] * 16)
    assert len(set(made)) == 1 and len(bytes.fromhex(made[0])) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["key"]  # no temporary file left behind


def test_a_damaged_secret_is_refused_not_used(tmp_path):
    path = tmp_path / "key"
    path.write_text("ab" * 5)  # a file cut short: an HMAC under it would be under a guessable key
    with pytest.raises(ValueError, match="not a 32-byte secret"):
        secret(path)


def test_a_private_file_is_written_whole_with_mode_600(tmp_path):
    path = tmp_path / "sub" / "f.json"
    write_private(path, "first")
    write_private(path, "second")
    assert path.read_text() == "second" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["f.json"]
