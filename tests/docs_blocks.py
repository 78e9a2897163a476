"""The documentation's fenced blocks, found, classified and checked (used by tests/test_docs.py).

Every fenced block of README.md and docs/*.md carries a marker word after its language:

    ```bash run / ```python run                     executed on CPU from the repository root (a scratch copy of it)
                                                     after `rdscale run -c conf/demo.yaml` made runs/demo
    ```bash gpu / ```bash cluster / ```bash internet  not run: shell syntax checked (bash -n), every `rdscale ...`
                                                     command parsed by rdscale's own argument parser and its config
                                                     (-c NAME, --set key=value) loaded by the real config loader,
                                                     every `python -c` / heredoc / script checked (imports resolve)
    ```text output                                  what a command prints; not run
    ```yaml config                                  a config fragment, loaded by the real config loader
    ```python api                                   an interface listing (docs/architecture.md): every `def NAME`
                                                     and `class NAME` in it must be defined in the rdscale package

The same command checker reads the commands of cluster/ray-cluster.yaml and cluster/kuberay-rayjob.yaml.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKERS = {"run", "gpu", "cluster", "internet", "output", "config", "api"}
CHECKED = {"gpu", "cluster", "internet"}  # not run; parsed and checked
SHELLS = {"bash", "sh", "shell", "console"}


class DocError(AssertionError):
    """A documented command, flag, config key, import or file that does not exist or fails."""


@dataclass
class Block:
    path: Path  # the Markdown file
    line: int  # 1-based line of the opening fence
    lang: str
    marker: str  # "" when unmarked
    text: str

    @property
    def where(self) -> str:
        try:
            name = self.path.relative_to(ROOT)
        except ValueError:
            name = self.path
        return f"{name}:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.lang in SHELLS


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def _closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= len(fence) and set(stripped) == {fence[0]}


def blocks(path: Path, text: str | None = None) -> list[Block]:
    """Fenced blocks of a Markdown file in order, indented ones (inside list items) included, content dedented."""
    lines = (path.read_text() if text is None else text).splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip().split()
        lang = info[0] if info else ""
        marker = info[1] if len(info) > 1 else ""
        body = []
        j = i + 1
        while j < len(lines) and not _closes(lines[j], fence):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        found.append(Block(path, i + 1, lang, marker, "\n".join(body) + "\n"))
        i = j + 1
    return found


def unmarked(block: Block) -> str | None:
    """Why a block's marker is not acceptable, or None."""
    if block.marker not in MARKERS:
        return f"{block.where}: fenced block ```{block.lang} has no marker (one of {', '.join(sorted(MARKERS))})"
    if block.marker == "output" and block.lang != "text":
        return f"{block.where}: output blocks are ```text output"
    if block.marker == "api" and block.lang != "python":
        return f"{block.where}: api blocks are ```python api"
    if block.marker == "config" and block.lang != "yaml":
        return f"{block.where}: config blocks are ```yaml config"
    if block.marker in {"run"} | CHECKED and block.lang not in SHELLS | {"python"}:
        return f"{block.where}: ```{block.lang} {block.marker}: only shell and python blocks run or are checked"
    return None


# ------------------------------------------------------------------------------------------------ static checks


def check_block(block: Block) -> None:
    """Check a block without running it: shell syntax and commands, Python imports, config fragments."""
    if block.marker == "config":
        check_config_fragment(block.text, block.where)
    elif block.marker == "api":
        check_api(block.text, block.where)
    elif block.is_shell:
        check_shell(block.text, block.where)
    elif block.lang == "python":
        check_python(block.text, block.where)


def _package_source() -> str:
    return "\n".join(p.read_text() for p in sorted((ROOT / "rdscale").rglob("*.py")))


def check_api(text: str, where: str) -> None:
    """Every function and class an interface listing names is defined in the package (a rename fails)."""
    source = _package_source()
    for kind, name in re.findall(r"^\s*(def|class)\s+(\w+)", text, flags=re.MULTILINE):
        if not re.search(rf"^\s*{kind}\s+{name}\b", source, flags=re.MULTILINE):
            raise DocError(f"{where}: `{kind} {name}` is not defined anywhere in rdscale/")


def check_config_fragment(text: str, where: str) -> None:
    from rdscale.config import ConfigError, load_config

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fragment.yaml"
        path.write_text(text)
        try:
            load_config(path)
        except ConfigError as err:
            raise DocError(f"{where}: config fragment refused by the config loader: {err}") from None


def check_shell(text: str, where: str) -> None:
    """bash -n, then every command that runs rdscale or Python (or names a repository file) checked."""
    proc = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise DocError(f"{where}: shell syntax: {proc.stderr.strip()}")
    for argv, heredoc in commands(text):
        check_command(argv, heredoc, where)


def commands(text: str) -> list[tuple[list[str], str | None]]:
    """Simple commands of a shell snippet, as argv lists (leading VAR=value assignments dropped), each with the body
    of the heredoc it reads, if any. Continuation lines are joined; `&&`, `||`, `;`, `|`, `&` and `$(...)` split."""
    lines = text.replace("\\\n", " ").splitlines()
    out: list[tuple[list[str], str | None]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        heredoc = None
        m = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if m:
            end = m[1]
            body = []
            while i < len(lines) and lines[i].strip() != end:
                body.append(lines[i])
                i += 1
            i += 1
            heredoc = "\n".join(body) + "\n"
            line = line[: m.start()]
        line, inner = _substitutions(line)
        lines[i:i] = inner  # a command substitution's commands are checked as commands of their own
        try:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            tokens = list(lexer)
        except ValueError as err:
            raise DocError(f"cannot split shell line {line!r}: {err}") from None
        argv: list[str] = []
        tokens = [t for k, t in enumerate(tokens)  # the fd of `2>&1`, split off by the lexer, is no argument
                  if not (t.isdigit() and k + 1 < len(tokens) and tokens[k + 1][:1] in "<>")]
        for tok in tokens + [";"]:
            if tok and set(tok) <= set(";&|"):
                if argv:
                    out.append((argv, heredoc))
                argv = []
            elif set(tok) <= set("<>") or re.fullmatch(r"\d?>+&?\d*", tok):
                argv.append("\0redirect")
            else:
                argv.append(tok)
        # a redirect's target is no argument
        out = [([a for k, a in enumerate(av) if a != "\0redirect" and (k == 0 or av[k - 1] != "\0redirect")], h)
               for av, h in out]
    return [(argv, h) for argv, h in out if argv]


def _substitutions(line: str) -> tuple[str, list[str]]:
    """`line` with each top-level `$(...)` (outside single quotes) replaced by a word, and the inner commands."""
    out, inner, i, quote = [], [], 0, None
    while i < len(line):
        c = line[i]
        if quote == "'":
            quote = None if c == "'" else quote
        elif c == "'" and quote is None:
            quote = c
        elif c == '"':
            quote = None if quote == '"' else '"'
        elif line.startswith("$(", i):
            depth, j, q = 1, i + 2, None
            while j < len(line) and depth:
                ch = line[j]
                if q:
                    q = None if ch == q else q
                elif ch in "'\"":
                    q = ch
                elif ch == "(":
                    depth += 1
                elif ch == ")":
                    depth -= 1
                j += 1
            inner.append(line[i + 2:j - 1])
            out.append("SUBSTITUTED")
            i = j
            continue
        out.append(c)
        i += 1
    return "".join(out), inner


_WRAPPERS = {"time", "env", "exec", "nohup", "sudo"}


def check_command(argv: list[str], heredoc: str | None, where: str) -> None:
    while argv and (re.fullmatch(r"[A-Za-z_]\w*=.*", argv[0]) or argv[0] in _WRAPPERS):
        argv = argv[1:]
    if not argv:
        return
    prog = os.path.basename(argv[0])
    if prog == "rdscale":
        check_rdscale(argv[1:], where)
    elif re.fullmatch(r"python[\d.]*", prog):
        check_python_command(argv[1:], heredoc, where)
    elif prog == "ray" and "--" in argv:
        check_command(argv[argv.index("--") + 1:], heredoc, where)
    elif prog == "ray" and len(argv) > 2 and argv[1] in ("up", "down", "attach", "dashboard", "exec", "submit"):
        check_repo_file(argv[2], where)
    elif prog == "kubectl" and len(argv) > 1 and argv[1] in ("apply", "create", "delete") and "-f" in argv:
        check_repo_file(argv[argv.index("-f") + 1], where)
    elif prog in ("bash", "sh") and len(argv) > 1 and not argv[1].startswith("-"):
        check_repo_file(argv[1], where)


def check_repo_file(name: str, where: str) -> None:
    if "$" in name or "://" in name or name.startswith(("/", "~")):
        return  # a user's own location
    if not (ROOT / name).exists():
        raise DocError(f"{where}: {name} does not exist in the repository")


def check_python_command(args: list[str], heredoc: str | None, where: str) -> None:
    while args and args[0] in ("-u", "-O", "-B", "-s", "-I"):
        args = args[1:]
    if not args:
        return
    if args[0] == "-c" and len(args) > 1:
        check_python(args[1], where)
    elif args[0] == "-m" and len(args) > 1:
        if args[1] == "rdscale":
            check_rdscale(args[2:], where)
        elif importlib.util.find_spec(args[1].split(".")[0]) is None:
            raise DocError(f"{where}: python -m {args[1]}: no such module")
    elif args[0] == "-" and heredoc is not None:
        check_python(heredoc, where)
    elif args[0].endswith(".py"):
        check_repo_file(args[0], where)
        if args[0].lstrip("./").startswith("jobs/rdscale_job.py"):
            check_rdscale(args[1:], where)  # the job entry point is the CLI itself


def check_python(code: str, where: str) -> None:
    """The code compiles, and every import in it resolves (`from a import b`: module a has b)."""
    try:
        tree = ast.parse(code)
    except SyntaxError as err:
        raise DocError(f"{where}: Python syntax: {err}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                _require_module(alias.name, where)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            module = _require_module(node.module, where)
            for alias in node.names:
                if alias.name != "*" and not hasattr(module, alias.name) and not (
                        hasattr(module, "__path__") and importlib.util.find_spec(f"{node.module}.{alias.name}")):
                    raise DocError(f"{where}: `from {node.module} import {alias.name}`: {node.module} has no "
                                   f"{alias.name}")


def _require_module(name: str, where: str):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise DocError(f"{where}: `import {name}` fails: {err}") from None


def check_rdscale(argv: list[str], where: str) -> argparse.Namespace | None:
    """Parse `rdscale ARGV` with rdscale's own parser; load its config (-c, flags, --set) with the real loader."""
    from rdscale.cli.args import resolve_run
    from rdscale.cli.main import _load, build_parser
    from rdscale.config import ConfigError, load_config

    parser = build_parser(full=True)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = parser.parse_args(argv)
            resolve_run(args, parser)
    except SystemExit as stop:
        if stop.code in (0, None):  # --help, --version
            return None
        raise DocError(f"{where}: `rdscale {' '.join(argv)}`: {err.getvalue().strip()}") from None
    try:
        if hasattr(args, "config"):
            _load(args)
        elif getattr(args, "overrides", None):  # update/extend: --set over the run's recorded config
            load_config(None, args.overrides)
    except ConfigError as error:
        raise DocError(f"{where}: `rdscale {' '.join(argv)}`: {error}") from None
    return args


# ------------------------------------------------------------------------------------------------ running


def scratch_env(bin_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = bin_dir or Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_shell(block: Block, cwd: Path, timeout: float = 180) -> str:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=cwd, env=scratch_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode:
        raise DocError(f"{block.where}: exit {proc.returncode}\n{block.text}\n--- output ---\n"
                       f"{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout + proc.stderr


def run_python(block: Block, cwd: Path, scope: dict) -> None:
    """exec in `scope` (shared by the file's Python blocks, like a notebook), from `cwd`."""
    here = os.getcwd()
    os.chdir(cwd)
    try:
        exec(compile(block.text, block.where, "exec"), scope)  # noqa: S102 - the docs' own code, run as written
    except Exception as err:  # noqa: BLE001 - any failure of a documented block is a docs failure
        raise DocError(f"{block.where}: {type(err).__name__}: {err}\n{block.text}") from err
    finally:
        os.chdir(here)


def run_file_blocks(found: list[Block], cwd: Path) -> int:
    """Run the `run` blocks in order (shell and Python), check the others; returns how many ran."""
    scope: dict = {"__name__": "__docs__"}
    ran = 0
    for block in found:
        problem = unmarked(block)
        if problem:
            raise DocError(problem)
        if block.marker == "run":
            if block.is_shell:
                check_shell(block.text, block.where)  # a typo'd flag is named even where it would run
                run_shell(block, cwd)
            else:
                run_python(block, cwd, scope)
            ran += 1
        else:
            check_block(block)
    return ran


IGNORE = ("..git", ".git", ".venv", "runs", "models", "__pycache__", "*.egg-info", ".pytest_cache", "gpu_deps",
          ".hypothesis", "build", "dist")


def scratch_repo(dst: Path) -> Path:
    """A copy of the repository's files (no venv, runs or models) with the demo run made: what a user has after
    `rdscale make-tiny-family models/tiny && rdscale run -c conf/demo.yaml` (the copy's own config file: `-c demo`
    names the installed one, whose paths lead to the checkout rdscale is installed from)."""
    import shutil

    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(*IGNORE))
    env = scratch_env()
    for cmd in (["rdscale", "-q", "make-tiny-family", "models/tiny"], ["rdscale", "-q", "run", "-c", "conf/demo.yaml", "--local"]):
        proc = subprocess.run(cmd, cwd=dst, env=env, capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode:
            raise DocError(f"demo setup {' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    return dst
