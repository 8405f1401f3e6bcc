"""Every reference in the repository points into the repository.

What a reader needs lives in docs/, so no file may send them anywhere else:

- no file cites a document by section sign, by kind or by a path outside the checkout;
- every `*.md` a file names exists (relative to that file or to the root);
- every relative markdown link in the repository's markdown resolves, anchors included;
- every section named as `docs/x.md, "Heading"` is a heading of docs/x.md;
- every repository path and test function README.md and docs/ name exists (a path may
  also be generated: ignored by git);
- the field-number tables of docs/ambient.md are exactly what our protos declare.

Upstream files are cited with their repository in front (`istio/ztunnel/src/proxy.rs`,
`linux/net/ipv4/tcp_bpf.c`), so they never read as paths of ours. The files scanned are
git's (tracked plus untracked, not ignored); this file is left out, since it must spell
out what it looks for.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pb2 import DescriptorProto, FieldDescriptorProto

from eztunnel_plugin.pb.envoy.config.core.v3 import base_pb2
from eztunnel_plugin.pb.envoy.service.discovery.v3 import discovery_pb2
from eztunnel_plugin.pb.google.rpc import status_pb2
from eztunnel_plugin.pb.istio.security import authorization_pb2
from eztunnel_plugin.pb.istio.workload import workload_pb2

ROOT = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve().relative_to(ROOT).as_posix()

# The private notes (and ways of citing them) that nobody reading this repository can open.
# A note that is not in the repository is caught by name below (every `*.md` named must
# exist); this catches the ways of citing one without a file name: by section sign, by
# kind ("the facts sheet"), or by an absolute path into a workspace outside the checkout.
PRIVATE = re.compile(
    r"\bdesign (?:notes|doc)\b|\bfacts (?:sheet|section)\b|§|/work/\w+/",
    re.IGNORECASE,
)
# Markdown files that are named but are not documents of the repository.
NOT_DOCUMENTS = {"results.md"}  # written by `make bench` into bench-results/<timestamp>/
# Where paths of ours start (what README.md and docs/ cite).
OUR_DIRS = ("src", "tests", "bpf", "proto", "charts", "tools", "lab", "docs")
# Directories never scanned when git is not there to say what is ignored.
UNSCANNED = {
    ".git",
    ".venv",
    "node_modules",
    "build",
    "bench-results",
    "target",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
}
GENERATED = (
    "bpf/vmlinux.h",
    "src/eztunnel_plugin/pb/",
    "src/eztunnel_plugin/data/",
    "src/eztunnel_lab/data/",
)

MD_NAME = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w-]+\.md)\b")
SECTION_REF = re.compile(r'(?<![\w./-])((?:[\w.-]+/)*[\w-]+\.md)(?:,\s*|\s+)"([^"]+)"')
MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
OUR_PATH = re.compile(r"(?<![\w./:~-])((?:" + "|".join(OUR_DIRS) + r")/[\w./-]*)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")
# A line break inside a comment: the next line's comment marker goes with it.
COMMENT_BREAK = re.compile(r"[ \t]*\n[ \t]*(?:(?:\*|#+|//|--)(?![\w*/#-]))?[ \t]*")


def _git_files() -> list[str] | None:
    try:
        done = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return sorted({name for name in done.stdout.decode().split("\0") if name})


@cache
def repo_files() -> tuple[str, ...]:
    """Repository-relative paths of every file that exists (git's view when available)."""
    names = _git_files()
    if names is None:  # not a checkout (a source archive): walk it
        names = []
        for top, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in UNSCANNED and not d.endswith(".egg-info")]
            names += [(Path(top) / f).relative_to(ROOT).as_posix() for f in files]
        names = [n for n in names if not n.startswith(GENERATED) or n.endswith("__init__.py")]
    return tuple(sorted(n for n in names if (ROOT / n).is_file()))


@cache
def text_of(name: str) -> str | None:
    """The file's text, or None for a binary file."""
    raw = (ROOT / name).read_bytes()
    if b"\0" in raw:
        return None
    return raw.decode("utf-8", errors="replace")


def texts(names: tuple[str, ...] | None = None) -> Iterator[tuple[str, str]]:
    for name in repo_files() if names is None else names:
        text = text_of(name)
        if name != SELF and text is not None:
            yield name, text


def markdown_files() -> tuple[str, ...]:
    return tuple(n for n in repo_files() if n.endswith(".md"))


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _joined(text: str) -> str:
    """Text with line breaks (and the comment markers after them) as single spaces."""
    return COMMENT_BREAK.sub(" ", text)


def resolve(citing: str, target: str) -> Path | None:
    """The file or directory target names, relative to the citing file or to the root."""
    for base in (ROOT / citing).parent, ROOT:
        path = (base / target).resolve()
        if path.is_relative_to(ROOT) and path.exists():
            return path
    return None


def slug(heading: str) -> str:
    """GitHub's anchor for a heading (without the -1, -2 suffixes of repeats)."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def headings(path: Path) -> tuple[str, ...]:
    """The headings of a markdown file, outside code blocks, whitespace normalized."""
    found, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := HEADING.match(line)):
            found.append(" ".join(m.group(2).split()))
    return tuple(found)


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in headings(path):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


# ---- 1-5: references -------------------------------------------------------------


def test_the_scan_sees_the_repository() -> None:
    # Guards the guard: an empty or partial file list would make every check below pass.
    names = set(repo_files())
    assert {"README.md", "docs/dataplane.md", "bpf/eztunnel.bpf.c", "pyproject.toml"} <= names
    assert SELF in names
    assert not [n for n in names if n.startswith((".venv/", "node_modules/", ".git/"))]


def test_no_file_cites_a_private_document() -> None:
    found = [
        f"{name}:{_line(text, m.start())}: {m.group(0)!r}"
        for name, text in texts()
        for m in PRIVATE.finditer(text)
    ]
    assert not found, "references to documents outside the repository:\n" + "\n".join(found)


def test_every_markdown_file_named_exists() -> None:
    missing = [
        f"{name}:{_line(text, m.start())}: {m.group(1)}"
        for name, text in texts()
        for m in MD_NAME.finditer(text)
        if Path(m.group(1)).name not in NOT_DOCUMENTS and resolve(name, m.group(1)) is None
    ]
    assert not missing, "markdown files named but not in the repository:\n" + "\n".join(missing)


def test_relative_markdown_links_resolve() -> None:
    broken = []
    for name, text in texts(markdown_files()):
        for m in MD_LINK.finditer(text):
            target = m.group(1)
            if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            path = resolve(name, file_part) if file_part else ROOT / name
            where = f"{name}:{_line(text, m.start())}: {target}"
            if path is None:
                broken.append(f"{where} (no such file)")
            elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
                broken.append(f"{where} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_named_sections_exist() -> None:
    # `docs/x.md, "Heading"` (or `x.md "Heading"`), also when a comment wraps the line.
    wrong = []
    for name, text in texts():
        for m in SECTION_REF.finditer(_joined(text)):
            doc, section = m.group(1), " ".join(m.group(2).split())
            path = resolve(name, doc)
            if path is None or path.suffix != ".md" or not path.is_file():
                continue  # reported by test_every_markdown_file_named_exists
            if section not in headings(path) and section not in map(_plain, headings(path)):
                wrong.append(f"{name}: {doc}, {section!r}")
    assert not wrong, "sections named that do not exist:\n" + "\n".join(wrong)


def _plain(heading: str) -> str:
    return heading.replace("`", "")


def _ignored(paths: list[str]) -> set[str]:
    """The paths git ignores (generated ones: built by make, never committed)."""
    if not paths:
        return set()
    try:
        done = subprocess.run(
            ["git", "check-ignore", "--no-index", "--stdin", "-z"],
            cwd=ROOT, input="\0".join(paths).encode(), capture_output=True, check=False,
            timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return set()
    return {p for p in done.stdout.decode().split("\0") if p}


def test_paths_named_in_readme_and_docs_exist() -> None:
    cited: dict[str, list[str]] = {}
    docs = tuple(n for n in markdown_files() if n == "README.md" or n.startswith("docs/"))
    for name, text in texts(docs):
        for m in OUR_PATH.finditer(text):
            path = m.group(1).rstrip(".")
            if not (ROOT / path).exists():
                cited.setdefault(path, []).append(f"{name}:{_line(text, m.start())}")
    missing = [f"{', '.join(where)}: {p}" for p, where in cited.items() if p not in _ignored([p])]
    assert not missing, "paths named that do not exist:\n" + "\n".join(missing)


def test_tests_named_in_readme_and_docs_exist() -> None:
    # docs/kernel.md cites the tests that show each behaviour by function name.
    defined = {
        m.group(1)
        for name, text in texts()
        if name.startswith("tests/") and name.endswith(".py")
        for m in re.finditer(r"^(?:async )?def (test_\w+)", text, re.MULTILINE)
    }
    docs = tuple(n for n in markdown_files() if n == "README.md" or n.startswith("docs/"))
    missing = [
        f"{name}:{_line(text, m.start())}: {m.group(1)}"
        for name, text in texts(docs)
        for m in re.finditer(r"`(test_\w+)`", text)
        if m.group(1) not in defined
    ]
    assert not missing, "tests named that do not exist:\n" + "\n".join(missing)


# ---- 6: the wire contract in docs/ambient.md ------------------------------------

AMBIENT = ROOT / "docs" / "ambient.md"
CONTRACT_FILES = (workload_pb2, authorization_pb2, discovery_pb2, base_pb2, status_pb2)
SCALARS = {
    FieldDescriptorProto.TYPE_STRING: "string",
    FieldDescriptorProto.TYPE_BYTES: "bytes",
    FieldDescriptorProto.TYPE_BOOL: "bool",
    FieldDescriptorProto.TYPE_INT32: "int32",
    FieldDescriptorProto.TYPE_UINT32: "uint32",
    FieldDescriptorProto.TYPE_INT64: "int64",
    FieldDescriptorProto.TYPE_UINT64: "uint64",
}
Fields = dict[str, dict[int, tuple[str, str]]]  # message -> number -> (field, type)


def _type_name(package: str, name: str) -> str:
    name = name.lstrip(".")
    return name[len(package) + 1 :] if name.startswith(package + ".") else name


def _declared() -> tuple[Fields, dict[str, dict[str, int]], dict[str, set[int]]]:
    """Messages (field number -> name, type as written in .proto), enums, reserved numbers."""
    fields: Fields = {}
    enums: dict[str, dict[str, int]] = {}
    reserved: dict[str, set[int]] = {}

    def walk(pkg: str, msg: DescriptorProto, prefix: str) -> None:
        full = f"{prefix}.{msg.name}"
        entries = {f"{full}.{n.name}": n for n in msg.nested_type if n.options.map_entry}
        for nested in msg.nested_type:
            if not nested.options.map_entry:
                walk(pkg, nested, full)
        for e in msg.enum_type:
            enums[f"{full}.{e.name}"] = {v.name: v.number for v in e.value}
        out = fields.setdefault(full, {})
        for f in msg.field:
            entry = entries.get(f.type_name.lstrip("."))
            if entry is not None:
                k, v = (_field_type(pkg, x) for x in entry.field)
                kind = f"map<{k}, {v}>"
            else:
                kind = _field_type(pkg, f)
                if f.label == FieldDescriptorProto.LABEL_REPEATED:
                    kind = "repeated " + kind
                elif f.proto3_optional:
                    kind = "optional " + kind
            out[f.number] = (f.name, kind)
        reserved[full] = {n for r in msg.reserved_range for n in range(r.start, r.end)}

    for module in CONTRACT_FILES:
        fdp = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(fdp)
        for msg in fdp.message_type:
            walk(fdp.package, msg, fdp.package)
        for e in fdp.enum_type:
            enums[f"{fdp.package}.{e.name}"] = {v.name: v.number for v in e.value}
    return fields, enums, reserved


def _field_type(pkg: str, f: FieldDescriptorProto) -> str:
    return SCALARS.get(f.type) or _type_name(pkg, f.type_name)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _code(cell: str) -> str:
    return " ".join(cell.replace("`", "").split())


def _documented() -> tuple[Fields, dict[str, dict[str, int]], dict[str, set[int]]]:
    """The tables headed `| message | number | field | type |` and `| enum | values |`."""
    fields: Fields = {}
    enums: dict[str, dict[str, int]] = {}
    reserved: dict[str, set[int]] = {}
    kind, current = "", ""
    for line in AMBIENT.read_text(encoding="utf-8").splitlines():
        if not line.lstrip().startswith("|"):
            kind = ""
            continue
        cells = _cells(line)
        if [c.lower() for c in cells] == ["message", "number", "field", "type"]:
            kind = "message"
        elif [c.lower() for c in cells] == ["enum", "values"]:
            kind = "enum"
        elif kind and not set("".join(cells)) <= set("-: "):
            if kind == "message" and len(cells) == 4:
                current = _code(cells[0]) or current
                number = int(cells[1])
                if cells[2] == "reserved":
                    reserved.setdefault(current, set()).add(number)
                else:
                    fields.setdefault(current, {})[number] = (_code(cells[2]), _code(cells[3]))
            elif kind == "enum" and len(cells) == 2:
                values = re.findall(r"`(\w+)`\s*=?\s*(\d+)", cells[1])
                enums[_code(cells[0])] = {n: int(v) for n, v in values}
    return fields, enums, reserved


def test_ambient_doc_lists_exactly_the_fields_our_protos_declare() -> None:
    assert AMBIENT.is_file()
    got_fields, got_enums, got_reserved = _documented()
    want_fields, want_enums, want_reserved = _declared()
    assert got_fields == want_fields
    assert got_enums == want_enums
    assert got_reserved == {m: r for m, r in want_reserved.items() if r}


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ('see docs/a.md, "The path"', [("docs/a.md", "The path")]),
        ('(docs/a.md "Kernel\n * pitfalls")', [("docs/a.md", "Kernel pitfalls")]),
        ('# docs/a.md, "Two\n    # lines"', [("docs/a.md", "Two lines")]),
        ('x("docs/a.md", "not a section")', []),
    ],
)
def test_section_references_are_found_across_comment_lines(
    doc: str, expected: list[tuple[str, str]]
) -> None:
    found = [(m.group(1), " ".join(m.group(2).split())) for m in SECTION_REF.finditer(_joined(doc))]
    assert found == expected


def test_private_names_and_dangling_files_are_caught() -> None:
    assert PRIVATE.search("see notes.md §7") and PRIVATE.search("the facts sheet")
    assert PRIVATE.search("read /work/notes/x.txt")
    assert MD_NAME.search("see notes-elsewhere.md section 4.3")
    assert resolve("src/x.py", "notes-elsewhere.md") is None
    assert not PRIVATE.search('docs/ambient.md, "The path"')
    assert resolve("src/x.py", "nothing-here.md") is None
    assert resolve("docs/simulator.md", "xds.md") == ROOT / "docs" / "xds.md"
    assert slug("The `ez_config` map (v2)") == "the-ez_config-map-v2"
