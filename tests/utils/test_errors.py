"""One-line user errors: collected messages, JSON files, the CLI wrapper."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slime.utils.errors import UserError, raise_collected, read_json_file


def test_raise_collected_joins_every_message_and_is_silent_without_any():
    raise_collected(["", ""])
    with pytest.raises(UserError, match=r"^--a is bad; --b is bad$"):
        raise_collected(["--a is bad", "", "--b is bad"])


def test_read_json_file_names_the_file_and_the_fix(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"r": 4}')
    assert read_json_file(good, missing="unused") == {"r": 4}
    with pytest.raises(UserError, match=r"^nothing there, pass another$"):
        read_json_file(tmp_path / "absent.json", missing="nothing there, pass another")
    with pytest.raises(UserError, match=r"^nothing there$"):
        read_json_file(tmp_path, missing="nothing there")  # a directory is not a JSON file
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"r": \xff')
    with pytest.raises(UserError) as info:
        read_json_file(bad, missing="unused", corrupt_fix="; write it again")
    message = str(info.value)
    assert message.startswith(f"{bad}: not valid JSON (") and message.endswith("; write it again")
    assert "\n" not in message


def test_run_main_prints_one_line_and_exits_2():
    code = "from slime.utils.errors import UserError, run_main\ndef f(): raise UserError('--x: bad, use --y')\nrun_main(f)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == "error: --x: bad, use --y\n"
