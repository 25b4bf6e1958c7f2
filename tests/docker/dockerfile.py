"""Just enough of a Dockerfile parser for the tests: instructions with their arguments, continuation lines joined,
comments dropped, ENV and ARG split into names and values."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV, ...
    arguments: str  # the rest of the instruction, continuation lines joined with single spaces
    stage: int  # 0-based index of the FROM it belongs to (-1 before the first FROM)


def parse_dockerfile(path: Path) -> list[Instruction]:
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1].strip() + " "
            continue
        text = (pending + stripped).strip()
        pending = ""
        keyword, _, arguments = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, arguments.strip(), stage))
    return instructions


def key_values(arguments: str) -> dict[str, str]:
    """``ENV A=1 B="two words"`` or ``ARG NAME=default`` -> {name: value} (shell quoting removed)."""
    values = {}
    for word in shlex.split(arguments):
        name, _, value = word.partition("=")
        values[name] = value
    return values


def environment(instructions: list[Instruction], stage: int | None = None) -> dict[str, str]:
    """The ENV of the last stage (or ``stage``), later assignments winning."""
    last = max(instruction.stage for instruction in instructions) if stage is None else stage
    merged: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV" and instruction.stage == last:
            merged.update(key_values(instruction.arguments))
    return merged


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    """Every ARG with its default."""
    found: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ARG":
            found.update(key_values(instruction.arguments))
    return found


def exec_form(arguments: str) -> list[str]:
    """``["a", "b"]`` (JSON array form of CMD, ENTRYPOINT, HEALTHCHECK CMD) -> ["a", "b"]."""
    match = re.search(r"\[.*\]", arguments)
    if match is None:
        raise ValueError(f"not in exec form: {arguments}")
    return json.loads(match.group(0))
