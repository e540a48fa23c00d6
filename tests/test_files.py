"""Writing files: no overwrite race, unwritable folders found before any work, a full disk or a
signal never leaves a truncated or hidden file, and files get the user's umask."""

import errno
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import sparsecirc.files as files
from sparsecirc.checkpoint import read_checkpoint, save_checkpoint
from sparsecirc.cli import main
from sparsecirc.data import AdditionTask, load_split, make_split, save_split
from sparsecirc.model import build_model

from test_cli_and_packaging import TINY_TRAIN, _tiny_data


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_checkpoint_that_appears_during_the_save_is_not_replaced(tmp_path, tiny_config, monkeypatch):
    target, model = tmp_path / "m.pt", build_model(tiny_config)
    real_save = torch.save

    def save_while_another_run_finishes(record, file):
        real_save(record, file)
        target.write_bytes(b"another run's checkpoint")

    monkeypatch.setattr(torch, "save", save_while_another_run_finishes)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        save_checkpoint(target, model)
    assert target.read_bytes() == b"another run's checkpoint" and _names(tmp_path) == ["m.pt"]
    with pytest.raises(FileExistsError, match="pass --force"):  # the CLI's words
        save_checkpoint(target, model, replace_hint="--force")
    monkeypatch.setattr(torch, "save", real_save)
    save_checkpoint(target, model, overwrite=True)  # asked for: replaced
    assert read_checkpoint(target).config == tiny_config and _names(tmp_path) == ["m.pt"]


def test_a_split_that_appears_during_the_save_is_not_replaced(tmp_path, monkeypatch):
    target, split = tmp_path / "d.json", make_split(AdditionTask(1, 2), test_size=20, seed=0)
    real_publish = files._publish_new

    def publish_after_another(tmp, path, message):
        path.write_text("mine")
        real_publish(tmp, path, message)

    monkeypatch.setattr(files, "_publish_new", publish_after_another)
    with pytest.raises(FileExistsError, match="not overwriting it"):
        save_split(split, target)
    assert target.read_text() == "mine" and _names(tmp_path) == ["d.json"]


def test_without_hard_links_the_name_is_claimed_exclusively(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = files.write_atomically(tmp_path / "x.bin", lambda file: file.write(b"new"), overwrite=False)
    assert path.read_bytes() == b"new" and _names(tmp_path) == ["x.bin"]
    with pytest.raises(FileExistsError):
        files.write_atomically(path, lambda file: file.write(b"other"), overwrite=False)
    assert path.read_bytes() == b"new" and _names(tmp_path) == ["x.bin"]


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_leaves_no_truncated_split_and_says_so(tmp_path, monkeypatch, capsys):
    target = tmp_path / "d.json"
    with monkeypatch.context() as patch:  # the data reach the file, then the disk is full
        patch.setattr(os, "fsync", _full_disk)
        assert main(["data", "--operand-digits", "1", "--answer-digits", "2", "--test-size", "20", "--out", str(target)]) == 2
    assert capsys.readouterr().err == f"error: could not write {target}: no space left on the device\n"
    assert _names(tmp_path) == []  # neither a truncated d.json nor a hidden partial file
    assert main(["data", "--operand-digits", "1", "--answer-digits", "2", "--test-size", "20", "--out", str(target)]) == 0
    assert load_split(target).task == AdditionTask(1, 2)


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    data = _tiny_data(tmp_path)
    capsys.readouterr()

    def torch_full_disk(record, file):  # how torch.save reports ENOSPC
        file.write(b"PK\x03\x04 partial zip")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", torch_full_disk)
    out = tmp_path / "runs" / "m.pt"
    assert main(["train", "--data", str(data), "--out", str(out), *TINY_TRAIN, "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    message = err.splitlines()[-1]  # after the progress bar
    assert "Traceback" not in err and message.startswith(f"error: could not write {out}") and "disk full" in message
    assert _names(out.parent) == []


def test_an_unwritable_out_is_refused_before_any_training(tmp_path, monkeypatch, capsys):
    data = _tiny_data(tmp_path)
    capsys.readouterr()
    real_mkstemp = tempfile.mkstemp

    def read_only_folder(*args, dir=None, **kwargs):  # the tests run as root here: chmod would not stop it
        if dir is not None and "locked" in str(dir):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only_folder)
    monkeypatch.setattr("sparsecirc.cli.train", lambda *a, **k: pytest.fail("trained before checking the folder"))
    monkeypatch.setattr("sparsecirc.cli.sparsify", lambda *a, **k: pytest.fail("sparsified before checking"))
    locked = tmp_path / "locked"
    locked.mkdir()
    base = tmp_path / "base.pt"
    save_checkpoint(base, build_model(_tiny_model_config()))
    for command in (["train", "--data", str(data), "--out", str(locked / "m.pt"), *TINY_TRAIN],
                    ["sparsify", "--base", str(base), "--data", str(data), "--out", str(locked / "s.pt")],
                    ["data", "--operand-digits", "1", "--answer-digits", "2", "--test-size", "20", "--out", str(locked / "d.json")]):
        assert main(command) == 2
        assert "is not writable (Read-only file system)" in capsys.readouterr().err
    assert _names(locked) == []


def _tiny_model_config():
    from sparsecirc.model import ModelConfig
    return ModelConfig(operand_digits=1, answer_digits=2, n_layers=1, n_heads=2, d_head=4, d_model=8, d_mlp=16)


def test_sigterm_during_a_save_removes_the_partial_file(tmp_path):
    script = f"""
import os, signal, sys, time
from pathlib import Path
from sparsecirc.cli import _terminate
from sparsecirc.files import write_atomically
signal.signal(signal.SIGTERM, _terminate)
def write(file):
    file.write(b"half")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
write_atomically(Path({str(tmp_path / 'm.pt')!r}), write, overwrite=False)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert result.returncode == 128 + 15, result.stderr.decode()
    assert _names(tmp_path) == []


def test_written_files_get_the_users_umask(tmp_path, tiny_config):
    old = os.umask(0o027)
    try:
        path = save_checkpoint(tmp_path / "m.pt", build_model(tiny_config))
        split = save_split(make_split(AdditionTask(1, 2), 20, 0), tmp_path / "d.json")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640 and split.stat().st_mode & 0o777 == 0o640
