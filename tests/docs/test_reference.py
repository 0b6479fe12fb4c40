"""The generated references cover the product: every command of the ``mrivq`` command line and every key of
the config schema appears in what ``docs/hooks.py`` puts into the site, and the package's versions agree."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from tests.helpers import invoke

ROOT = Path(__file__).resolve().parents[2]


def _hooks():  # noqa: ANN202 - a module loaded from its file (docs/ is not a package)
    spec = importlib.util.spec_from_file_location("mrivq_docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_cli_command_is_in_the_cli_reference() -> None:
    hooks = _hooks()
    page = (ROOT / "docs" / "reference" / "cli.md").read_text()
    assert hooks.CLI_MARKER in page
    text = hooks.cli_markdown()
    headings = set(re.findall(r"^#+ `(mrivq[^`]*)`", text, flags=re.M))
    commands = hooks.cli_commands()
    assert {"mrivq", "mrivq train", "mrivq synth", "mrivq datasets show"} <= set(commands)
    missing = [c for c in commands if c not in headings]
    assert not missing, f"commands missing from the CLI reference: {missing}"


def test_every_config_key_is_in_the_key_reference_with_a_description() -> None:
    hooks = _hooks()
    page = (ROOT / "docs" / "reference" / "config.md").read_text()
    assert hooks.KEYS_MARKER in page and hooks.PRESETS_MARKER in page
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w.]+)` \|(.*)$", hooks.config_keys_markdown(),
                                                           flags=re.M)}
    keys = hooks.config_keys()
    assert {"train.batch_size", "prior.model.positions", "data.register"} <= set(keys)
    missing = [k for k in keys if k not in rows]
    assert not missing, f"config keys missing from the reference: {missing}"
    undescribed = [k for k in keys if not rows[k].rstrip(" |").rsplit("|", 1)[-1].strip()]
    assert not undescribed, f"config keys without a description (docs/hooks.py NOTES): {undescribed}"


def test_every_preset_is_in_the_preset_table() -> None:
    table = _hooks().presets_markdown()
    for path in (ROOT / "configs").glob("*.yaml"):
        assert f"| `{path.stem}` |" in table


def test_versions_agree() -> None:
    import mrivq

    project = (ROOT / "pyproject.toml").read_text().split("[project]", 1)[1]
    declared = re.search(r'^version = "([^"]+)"', project, flags=re.M).group(1)
    assert mrivq.__version__ == declared
    res = invoke("--version")
    assert res.exit_code == 0 and res.output.strip() == f"mrivq {declared}"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and f"## [{declared}]" in changelog
