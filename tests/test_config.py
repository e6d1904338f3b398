"""`kvd serve --config`, KVD_* variables and flags: one typed config, each bad value named."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kvd.server.config import ServeConfig
from kvd.server.config_file import ConfigError, load_config, to_toml

GiB = 1 << 30


def write(tmp_path: Path, text: str, name: str = "kvd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_file_env_flags_in_that_order(tmp_path):
    path = write(tmp_path, 'dram_bytes = "2GiB"\nnvme_bytes = 0\npolicy = "lru"\nwrite_behind = false\nlease_seconds = 12\n')
    config = load_config(path, {"KVD_DRAM_BYTES": "3GiB", "KVD_IO_THREADS": "4"}, {"policy": "typed"})
    assert config.dram_bytes == 3 * GiB  # the environment beats the file
    assert config.policy == "typed"  # a flag beats both
    assert (config.nvme_bytes, config.write_behind, config.lease_seconds, config.io_threads) == (0, False, 12.0, 4)
    assert config.socket == ServeConfig().socket  # untouched: the default
    assert load_config() == ServeConfig()


def test_the_clients_variables_are_not_settings():
    assert load_config(None, {"KVD_ADDR": "unix:///x", "KVD_TOKEN": "t", "PATH": "/bin"}) == ServeConfig()


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ('dram_bytez = "1GiB"\n', {}, "dram_bytez: unknown setting"),
        ("dram_bytes = [1]\n", {}, "dram_bytes: expected an integer"),
        ('dram_bytes = "lots"\n', {}, "dram_bytes"),
        ('write_behind = "yes"\n', {}, "write_behind: expected true or false"),
        ("socket = 3\n", {}, "socket: expected a path"),
        ("lease_seconds = -1\n", {}, "--lease-seconds must be positive"),
        ("dram_bytes = \n", {}, "not valid TOML"),
        ("", {"KVD_IO_THREADS": "many"}, "$KVD_IO_THREADS"),
        ("", {"KVD_WRITE_BEHIND": "maybe"}, "$KVD_WRITE_BEHIND: expected true or false"),
        ("", {"KVD_NOPE": "1"}, "$KVD_NOPE: unknown setting"),
        ("metrics_port = 70000\n", {}, "--metrics-port must be a TCP port, 1..65535"),
        ('metrics_port = "9400"\n', {"KVD_METRICS_PORT": "nine"}, "$KVD_METRICS_PORT"),
        ('metrics_host = ""\n', {}, "--metrics-host must be an address"),
    ],
)
def test_a_bad_value_is_an_error_naming_its_key(tmp_path, text, env, message):
    with pytest.raises(ConfigError, match=message.replace("$", r"\$").replace("[", r"\[")):
        load_config(write(tmp_path, text), env)


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "absent.toml")


def test_metrics_settings_come_from_file_env_and_flags(tmp_path):
    assert ServeConfig().metrics_port is None  # off unless asked for
    path = write(tmp_path, 'metrics_port = 9400\nmetrics_host = "127.0.0.1"\n')
    assert load_config(path).metrics_port == 9400
    config = load_config(path, {"KVD_METRICS_PORT": "9401"})
    assert (config.metrics_port, config.metrics_host) == (9401, "127.0.0.1")
    assert load_config(path, {"KVD_METRICS_PORT": ""}).metrics_port is None  # empty: off
    assert load_config(path, {}, {"metrics_port": 0}).metrics_port == 0  # 0: off, as a flag


def test_printed_config_reads_back_the_same(tmp_path):
    config = load_config(None, {"KVD_TCP": "127.0.0.1:7000", "KVD_TCP_INSECURE": "1", "KVD_NVME_DIR": '/var/lib/"kvd"'})
    text = to_toml(config)
    assert tomllib.loads(text)["tcp"] == "127.0.0.1:7000"
    assert load_config(write(tmp_path, text)) == config


def run_kvd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvd.cli.kvd_main", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_kvd_config_print_and_serve_refuse_bad_values_with_exit_2(tmp_path):
    path = write(tmp_path, 'dram_bytes = "512MiB"\npolicy = "lru"\n')
    r = run_kvd("config", "print", "--config", str(path))
    assert r.returncode == 0, r.stderr
    assert 'policy = "lru"' in r.stdout and f"dram_bytes = {512 << 20}" in r.stdout
    bad = write(tmp_path, 'polcy = "lru"\n', "bad.toml")
    for args in (("config", "print", "--config", str(bad)), ("serve", "--config", str(bad))):
        r = run_kvd(*args)
        assert r.returncode == 2
        assert len(r.stderr.strip().splitlines()) == 1 and "polcy: unknown setting" in r.stderr
    r = run_kvd("serve", "--config", str(path), "--policy", "belady")
    assert r.returncode == 2 and "kvd replay" in r.stderr
