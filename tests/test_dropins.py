"""Drop-in config files (``conf.d/*.toml`` next to the main file, merged in name order, as rsyslog.d):
real files, the real CLI, a real daemon reloading them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, record, wait_for, write_config

from nio_logd.config import load_file
from nio_logd.tools.client import send


def nio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nio_logd", *args], capture_output=True, text=True, timeout=60)


def _drop(tmp_path: Path, name: str, text: str) -> Path:
    folder = tmp_path / "conf.d"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def test_drop_ins_merge_in_name_order_and_check_config_says_who_set_each_key(tmp_path: Path) -> None:
    port = free_port()
    main = write_config(tmp_path, listeners=[{"address": f"tcp://127.0.0.1:{port}"}], log={"durability": "write"})
    _drop(tmp_path, "20-later.toml", '[log]\ndurability = "write"\nrotate_keep = 9\n')
    _drop(tmp_path, "10-first.toml", '[log]\ndurability = "fsync"\n[[listeners]]\naddress = "unix://d.sock"\n')
    _drop(tmp_path, "README", "not toml, not read")
    _drop(tmp_path, "15-off.toml.disabled", "[log]\nrotate_keep = 1\n")
    settings = load_file(main)
    assert [ls.address for ls in settings.listeners] == [f"tcp://127.0.0.1:{port}", "unix://d.sock"]
    assert settings.log.durability == "write" and settings.log.rotate_keep == 9
    shown = nio("check-config", "--config", str(main))
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    first, later = str(tmp_path / "conf.d" / "10-first.toml"), str(tmp_path / "conf.d" / "20-later.toml")
    assert doc["files"] == [str(main), first, later]
    assert doc["sources"]["log.durability"] == later  # 20 came after 10
    assert doc["sources"]["log.rotate_keep"] == later
    assert doc["sources"]["listeners.1.address"] == first
    assert doc["sources"]["listeners.0.address"] == str(main)
    assert doc["sources"]["log.path"] == str(main)


def test_an_error_in_a_drop_in_names_that_file(tmp_path: Path) -> None:
    main = write_config(tmp_path)
    bad = _drop(tmp_path, "50-bad.toml", '[log]\ndurability = "sometimes"\n')
    for result in (nio("check-config", "--config", str(main)), nio("run", "--config", str(main))):
        assert result.returncode == 78
        assert f"{bad}:2: log.durability:" in result.stderr, result.stderr
    bad.write_text("[log\n")
    result = nio("check-config", "--config", str(main))
    assert result.returncode == 78 and f"{bad}:1: invalid TOML" in result.stderr, result.stderr


def test_a_drop_in_folder_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    main = write_config(tmp_path)
    (tmp_path / "conf.d").write_text("")
    result = nio("check-config", "--config", str(main))
    assert result.returncode == 78 and "conf.d: not a directory" in result.stderr, result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the config-file rule is applied when started as root")
def test_a_drop_in_others_can_write_is_refused_like_the_main_file(tmp_path: Path) -> None:
    main = write_config(tmp_path)
    drop = _drop(tmp_path, "10-x.toml", "[log]\nrotate_keep = 2\n")
    drop.chmod(0o666)
    for result in (nio("check-config", "--config", str(main)), nio("run", "--config", str(main))):
        assert result.returncode == 78
        assert f"{drop}: refusing a config file writable by" in result.stderr, result.stderr


def test_sighup_rereads_the_drop_ins(tmp_path: Path, daemon_factory: Any) -> None:
    """A hot key set in a drop-in is applied by SIGHUP: a record rule lowered in conf.d refuses
    the next long message."""
    port = free_port()
    main = write_config(tmp_path, listeners=[{"address": f"tcp://127.0.0.1:{port}", "ack": True}])
    d = daemon_factory(main)
    assert send(d.address, [record(msg="x" * 100)], ack=True).acked == 1
    _drop(tmp_path, "10-rules.toml", "[record]\nmax_msg_chars = 50\n")
    d.signal(signal.SIGHUP)
    reloaded = wait_for(lambda: d.event("reloaded"), 10)
    assert reloaded["applied"] == {"record.max_msg_chars": 50}, reloaded
    wait_for(lambda: len(send(d.address, [record(msg="x" * 100)], ack=True).refused) == 1, 10)
    assert d.stop() == 0
