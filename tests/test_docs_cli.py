"""docs/cli.md is what the parsers say: `make docs` writes it, and this test fails when the
committed text differs from what `kvd`'s and `kvctl`'s parsers produce now."""

from __future__ import annotations

from pathlib import Path

from kvd.cli import docs

CLI_MD = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_docs_cli_md_is_what_the_parsers_produce():
    text = CLI_MD.read_text()
    assert docs.splice(text, docs.generate(), CLI_MD) == text, "docs/cli.md differs from the parsers: run `make docs`"


def test_every_documented_command_has_a_section():
    text = CLI_MD.read_text()
    for command in ("kvd serve", "kvd replay", "kvd bench", "kvd bench e2e", "kvd gen-workload agentic",
                    "kvd config print", "kvctl", "kvctl status", "kvctl sessions", "kvctl sync"):
        assert f"\n## `{command}`\n" in text, command
    assert "`--kv-events`" in text and "`--room-wait-seconds`" in text and "`--fault-plan`" not in text


def test_the_text_does_not_depend_on_the_terminal(monkeypatch):
    first = docs.generate()
    monkeypatch.setenv("COLUMNS", "40")
    assert docs.generate() == first


def test_check_and_write(tmp_path, capsys):
    copy = tmp_path / "cli.md"
    copy.write_text(f"# intro\n\n{docs.BEGIN}\nstale\n{docs.END}\n\ntail\n")
    assert docs.main(["--check", "--file", str(copy)]) == 1
    assert capsys.readouterr().err == f"kvd.cli.docs: {copy} differs from the parsers; run `make docs`\n"
    assert docs.main(["--file", str(copy)]) == 0
    written = copy.read_text()
    assert written.startswith("# intro\n\n") and written.endswith(f"{docs.END}\n\ntail\n") and "stale" not in written
    assert docs.main(["--check", "--file", str(copy)]) == 0


def test_a_file_without_markers_or_no_file_is_named(tmp_path, capsys):
    bare = tmp_path / "bare.md"
    bare.write_text("# nothing generated here\n")
    assert docs.main(["--file", str(bare)]) == 2
    assert capsys.readouterr().err.startswith(f"kvd.cli.docs: {bare}: no generated part")
    assert bare.read_text() == "# nothing generated here\n"
    assert docs.main(["--file", str(tmp_path / "missing.md")]) == 2
    assert "missing.md" in capsys.readouterr().err
