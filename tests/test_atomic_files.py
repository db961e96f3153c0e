"""write_files_atomically on its own: file modes, what a failure leaves, temp names, leftovers of a crash,
the copy fallback where hard links fail, and the directory fsync that makes the renames durable."""
import os
import re
import stat

import pytest

from fastlora.atomic_files import leftover_temp_files, write_files_atomically


class Fault(Exception):
    pass


def _writer(text: str, seen: list = None):
    def write(path: str) -> None:
        if seen is not None:
            seen.append(path)
        with open(path, "w") as f:
            f.write(text)
    return write


def _files(directory) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(directory.iterdir())}


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _failing_second_rename():
    """os.replace that raises Fault at its second call (the first file is in place by then)."""
    replace, calls = os.replace, []

    def failing(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise Fault("second rename")
        return replace(src, dst)
    return failing


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o022
    os.umask(old)


def test_new_files_get_the_umask_mode_and_replaced_files_keep_theirs(tmp_path, umask_022):
    target = tmp_path / "out"
    write_files_atomically(target, [("a.bin", _writer("1")), ("b.json", _writer("2"))])
    assert _files(target) == {"a.bin": "1", "b.json": "2"}
    assert _mode(target / "a.bin") == _mode(target / "b.json") == 0o666 & ~umask_022  # 0o644
    os.chmod(target / "a.bin", 0o751)
    write_files_atomically(target, [("a.bin", _writer("3")), ("b.json", _writer("4"))])
    assert _files(target) == {"a.bin": "3", "b.json": "4"}
    assert _mode(target / "a.bin") == 0o751 and _mode(target / "b.json") == 0o644


def test_temp_files_are_hidden_beside_their_file_with_twelve_hex_digits(tmp_path):
    seen = []
    write_files_atomically(tmp_path, [("weights.bin", _writer("w", seen)), ("config.json", _writer("c", seen))])
    names = [os.path.basename(p) for p in seen]
    assert all(os.path.dirname(p) == str(tmp_path) for p in seen)
    assert re.fullmatch(r"\.weights\.bin\.[0-9a-f]{12}\.tmp", names[0]), names
    assert re.fullmatch(r"\.config\.json\.[0-9a-f]{12}\.tmp", names[1]), names
    assert _files(tmp_path) == {"config.json": "c", "weights.bin": "w"}  # no temp file left


def test_a_failed_rename_into_an_empty_directory_leaves_it_empty(tmp_path, monkeypatch):
    """The first file is in place when the second rename fails: it is removed (no old one to put back)."""
    monkeypatch.setattr(os, "replace", _failing_second_rename())
    with pytest.raises(Fault, match="second rename"):
        write_files_atomically(tmp_path, [("a.bin", _writer("1")), ("b.json", _writer("2"))])
    assert _files(tmp_path) == {}


def test_the_next_save_removes_the_temp_files_a_crash_left(tmp_path):
    (tmp_path / "a.bin").write_text("old")
    crashed = [tmp_path / ".a.bin.0123456789ab.tmp", tmp_path / ".b.json.ba9876543210.tmp"]
    unrelated = [tmp_path / ".a.bin.0123.tmp", tmp_path / ".c.json.0123456789ab.tmp", tmp_path / "notes.txt"]
    for path in crashed + unrelated:
        path.write_text("x")
    assert leftover_temp_files(tmp_path, "a.bin") == [crashed[0]]
    write_files_atomically(tmp_path, [("a.bin", _writer("1")), ("b.json", _writer("2"))])
    assert set(_files(tmp_path)) == {"a.bin", "b.json", *(p.name for p in unrelated)}


def test_where_hard_links_fail_the_old_files_are_copied_and_restored(tmp_path, monkeypatch):
    write_files_atomically(tmp_path, [("a.bin", _writer("old a")), ("b.json", _writer("old b"))])

    def no_links(src, dst):
        raise PermissionError("hard links not supported here")

    monkeypatch.setattr(os, "link", no_links)
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", _failing_second_rename())
        with pytest.raises(Fault):
            write_files_atomically(tmp_path, [("a.bin", _writer("new a")), ("b.json", _writer("new b"))])
    assert _files(tmp_path) == {"a.bin": "old a", "b.json": "old b"}
    write_files_atomically(tmp_path, [("a.bin", _writer("new a")), ("b.json", _writer("new b"))])
    assert _files(tmp_path) == {"a.bin": "new a", "b.json": "new b"}


@pytest.mark.skipif(os.name != "posix", reason="directories are fsynced on POSIX only")
def test_the_directory_is_fsynced_after_the_renames(tmp_path, monkeypatch):
    fsync, renamed, synced = os.fsync, [], []
    replace = os.replace

    def recording_replace(src, dst):
        renamed.append(dst)
        return replace(src, dst)

    def recording_fsync(fd):
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), len(renamed)))
        return fsync(fd)

    monkeypatch.setattr(os, "replace", recording_replace)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_files_atomically(tmp_path, [("a.bin", _writer("1")), ("b.json", _writer("2"))])
    assert synced[-1] == (True, 2)  # the directory, once both renames are done
    assert [is_dir for is_dir, _ in synced[:2]] == [False, False]  # each temp file before any rename


def test_a_writer_that_replaces_its_file_still_gets_the_mode(tmp_path, umask_022):
    """safetensors writes a new file (mode 0o600) over the temp path: the mode is set after the writer."""
    def replacing(path: str) -> None:
        os.unlink(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"data")
        os.close(fd)

    write_files_atomically(tmp_path, [("w.safetensors", replacing)])
    assert _mode(tmp_path / "w.safetensors") == 0o644 and leftover_temp_files(tmp_path, "w.safetensors") == []
