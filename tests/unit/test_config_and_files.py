import os
from pathlib import Path

import pytest

from target_agent.config import TargetSettings
from vmrepl.config import ProgramSettings, load_settings
from vmrepl.disk.fileio import PositionalFile, atomic_write
from vmrepl.disk.raw import RawReader, RawWriter
from vmrepl.errors import ConfigError
from vmrepl.extent import Extent

BASE = """
datastore_root = "/tmp/ds"
controller_public_keys = ["/tmp/k.pub"]
[tls]
ca_file = "/c"
cert_file = "/c"
key_file = "/k"
"""


def test_config_file_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "t.toml"
    p.write_text(BASE + '[log]\nlevel = "debug"\n')
    monkeypatch.setenv("VMREPL_TARGET_LISTEN", "0.0.0.0:9")
    monkeypatch.setenv("VMREPL_TARGET_TLS__CERT_FILE", "/env-cert")
    s = load_settings(TargetSettings, p)
    assert s.listen == "0.0.0.0:9" and str(s.tls.cert_file) == "/env-cert" and s.log.level == "debug"


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("bogus = 1\n", "bogus"),
        ("max_window_batches = 1\n", "max_window_batches"),
        ('[log]\nlevel = "loud"\n', "log.level"),
    ],
)
def test_bad_keys_are_named(tmp_path: Path, extra: str, key: str) -> None:
    p = tmp_path / "t.toml"
    p.write_text(extra + BASE if not extra.startswith("[") else BASE + extra)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(TargetSettings, p)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(TargetSettings, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("x = = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(TargetSettings, bad)


def test_raw_writer_punches_holes_and_reader_sees_allocation(tmp_path: Path) -> None:
    path = tmp_path / "d.raw"
    mib = 1 << 20
    w = RawWriter(path, create=True)
    w.resize(8 * mib)
    w.write(b"\x01" * (4 * mib), 0)
    w.write_zeros(mib, 2 * mib)
    w.flush()
    w.close()
    r = RawReader(path)
    buf = bytearray(4 * mib)
    r.read_into(memoryview(buf), 0)
    assert buf[:mib] == b"\x01" * mib and buf[mib : 3 * mib] == bytes(2 * mib) and buf[3 * mib :] == b"\x01" * mib
    # Where the file system reports holes (ext4, xfs, tmpfs), the punched range is one.
    alloc = r.allocated_extents()
    assert Extent(mib, 2 * mib) not in alloc
    assert all(e.end <= 8 * mib for e in alloc)
    r.close()


def test_short_read_is_an_error(tmp_path: Path) -> None:
    from vmrepl.errors import DiskError

    path = tmp_path / "s.raw"
    path.write_bytes(b"x" * 100)
    r = RawReader(path)
    with pytest.raises(DiskError, match="short read"):
        r.read_into(memoryview(bytearray(200)), 0)


def test_atomic_write_replaces_whole(tmp_path: Path) -> None:
    p = tmp_path / "state.json"
    atomic_write(p, b"one")
    atomic_write(p, b"two")
    assert p.read_bytes() == b"two" and not (tmp_path / "state.json.tmp").exists()
    f = PositionalFile(p)
    assert f.size() == 3
    f.close()
    assert os.listdir(tmp_path) == ["state.json"]


@pytest.mark.parametrize("program", ["controller", "proxy", "target"])
def test_example_configs_in_deploy_are_valid(program: str) -> None:
    from controller.config import ControllerSettings
    from proxy_agent.config import ProxySettings
    from target_agent.config import TargetSettings

    classes: dict[str, type[ProgramSettings]] = {
        "controller": ControllerSettings,
        "proxy": ProxySettings,
        "target": TargetSettings,
    }
    path = Path(__file__).parents[2] / "deploy" / "config" / f"{program}.toml"
    settings = load_settings(classes[program], path)
    assert str(settings.tls.cert_file).endswith(f"{program}.pem")  # type: ignore[attr-defined]
