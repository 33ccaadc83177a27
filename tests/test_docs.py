"""The README and the user guide keep their promises: a short landing page, paths that exist, and
every ``hotdog`` command (directly, as a job, or under ``ray job submit``) accepted by the parser.
The tour and the serving examples are run for real in tests/test_tour.py."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from hotdog_ray.cli.main import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
JOBS = {p.stem: re.search(r'main\(\["(\w+)"', p.read_text()).group(1) for p in (REPO / "jobs").glob("*.py")}
# A repository path: one of our folders, then a name; not part of a URL or of another path.
PATH = re.compile(
    r"(?<![\w/.:-])((?:hotdog_ray|tests|bench|docs|k8s|cluster|serving|configs|jobs)/[\w.*/-]*[\w*])"
)


def code_blocks(doc: Path, language: str = "bash") -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", doc.read_text(), flags=re.S)


def command_lines(block: str) -> list[str]:
    """The block's commands: continuation lines joined, heredoc bodies left out."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines, heredoc = [], None
    for line in joined.splitlines():
        if heredoc:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        found = re.search(r"<<\s*'?(\w+)'?", line)
        heredoc = found.group(1) if found else None
        if line.strip() and not line.lstrip().startswith("#"):
            lines.append(line.strip())
    return lines


def doc_commands() -> list[tuple[str, str, list[str]]]:
    """Every command line of the docs' bash blocks: (document, line, its words with the leading
    ``VAR=value`` assignments and a trailing ``&`` taken off)."""
    found = []
    for doc in DOCS:
        for block in code_blocks(doc):
            for line in command_lines(block):
                try:
                    words = shlex.split(line, comments=True)
                except ValueError:  # a quote a shell would also refuse: not a command we can read
                    continue
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                    words = words[1:]
                words = [w for w in words if w != "&"]
                if words:
                    found.append((doc.relative_to(REPO).as_posix(), line, words))
    return found


def hotdog_args(words: list[str]) -> list[str] | None:
    """The ``hotdog`` arguments a command runs (``hotdog ...``, ``python jobs/X.py ...``, either
    after ``ray job submit ... --``), or None for another program."""
    if words[:3] == ["ray", "job", "submit"] and "--" in words:
        words = words[words.index("--") + 1 :]
    if words and Path(words[0]).name == "hotdog":
        return words[1:]
    if len(words) > 1 and Path(words[0]).name in ("python", "python3") and words[1].startswith("jobs/"):
        return [JOBS[Path(words[1]).stem], *words[2:]]
    return None


def all_hotdog_commands() -> list[tuple[str, str, list[str]]]:
    return [
        (doc, line, args) for doc, line, words in doc_commands() if (args := hotdog_args(words)) is not None
    ]


def test_the_readme_is_a_landing_page_of_at_most_150_lines():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert "```mermaid" in readme  # the pipeline picture, drawn by GitHub
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"the README does not link {page.name}"


def test_every_path_the_docs_name_exists():
    for doc in DOCS:
        named = {m.rstrip(".") for m in PATH.findall(doc.read_text())}
        missing = sorted(n for n in named if not list(REPO.glob(n)))
        assert not missing, f"{doc.relative_to(REPO)} names {missing}"


def test_the_docs_have_hotdog_commands_in_every_task_page():
    pages = {doc for doc, _, _ in all_hotdog_commands()}
    for page in ("README.md", "docs/data.md", "docs/training.md", "docs/sweeps.md", "docs/tracking.md"):
        assert page in pages, page
    assert len(all_hotdog_commands()) > 40


@pytest.mark.parametrize(
    "doc, line, args", all_hotdog_commands(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_hotdog_command_in_the_docs_parses(doc, line, args, capsys):
    """Commands that need a cluster, a cloud bucket or a dataset we do not ship are not run; the
    parser still rejects a misspelt command, flag or choice."""
    try:
        build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{doc}: `{line}` does not parse: {capsys.readouterr().err.strip()}")


def click_commands() -> list[tuple[str, str, list[str]]]:
    """``ray``, ``serve`` and ``mlflow`` command lines of the docs (``ray job submit`` whole: its
    options, and the job's entrypoint after ``--``, which click takes as arguments)."""
    return [
        (doc, line, words) for doc, line, words in doc_commands() if words[0] in ("ray", "serve", "mlflow")
    ]


@pytest.mark.parametrize("doc, line, words", click_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_ray_serve_and_mlflow_command_in_the_docs_parses(doc, line, words):
    """Ray's, Serve's and MLflow's own command-line parsers (click) accept the command as written:
    they need a cluster or a cloud account to run, so nothing runs."""
    import click
    from mlflow.cli import cli as mlflow_cli
    from ray.scripts.scripts import cli as ray_cli
    from ray.serve.scripts import cli as serve_cli

    group = {"ray": ray_cli, "serve": serve_cli, "mlflow": mlflow_cli}[words[0]]
    args = words[1:]
    try:
        ctx = group.make_context(words[0], list(args), resilient_parsing=False)
        command = group
        while isinstance(command, click.Group) and ctx.protected_args + ctx.args:
            name, command, rest = command.resolve_command(ctx, ctx.protected_args + ctx.args)
            ctx = command.make_context(name, rest, parent=ctx)
    except click.ClickException as exc:
        pytest.fail(f"{doc}: `{line}`: {exc.format_message()}")
