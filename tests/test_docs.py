"""The README and docs/ say what works: a README a newcomer reads in five minutes, links that
lead somewhere, and commands that parse as written (their flags, config files, `--set` keys
and values, meshes and input files), with the command's own parser."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from megajax import config, mesh

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Placeholders a reader replaces (a Hugging Face directory, a step, a count): not checked as paths.
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z_]+\b|^FILE:|\.\.\.")


def _commands(page: Path) -> list[str]:
    """The `python ...` lines of a page's shell blocks, continuations joined, comments and
    optional [...] parts dropped."""
    found = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", page.read_text(), flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip().rstrip("&").strip()
            line = re.sub(r"\[[^\]]*\]", "", line)
            if line.startswith("python "):
                found.append(line)
    return found


COMMANDS = [(page.name, c) for page in PAGES for c in _commands(page)]


def _module(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem + "_cli", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parser_of(argv: list[str]):
    """(the command's parse_args, its arguments) for `python train.py ...` or `python -m X`."""
    if argv[1] == "-m":
        name, args = argv[2], argv[3:]
        if name == "pytest":
            return None, args
        module = importlib.import_module(name)
    else:
        name, args = argv[1], argv[2:]
        if not (ROOT / name).is_file():
            raise AssertionError(f"{name} does not exist")
        if name.startswith(("scripts/", "experiments/")):
            return None, args
        module = _module(name)
    return module.parse_args, args


def test_the_readme_is_a_landing_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, len(lines)
    assert lines[0] == "# megajax"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if not target.startswith(("http://", "https://")):
            assert (page.parent / target).exists(), f"{page.name} links to {target}"


def test_every_docs_page_is_reachable_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, page.name


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_every_command_parses_as_written(page, command):
    argv = shlex.split(command)
    parse_args, args = _parser_of(argv)
    for arg in args:  # the inputs a command reads: shipped files, not outputs of earlier steps
        if re.match(r"^(configs|data)/", arg) and not PLACEHOLDER.search(arg):
            assert (ROOT / arg).exists(), f"{command}: {arg} does not exist"
    if parse_args is None:
        return
    parsed = parse_args(args)
    if getattr(parsed, "config", None) and not PLACEHOLDER.search(parsed.config):
        config.override(config.load(ROOT / parsed.config), parsed.set)
    if getattr(parsed, "mesh", None):
        mesh.parse(parsed.mesh)
