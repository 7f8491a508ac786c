#!/usr/bin/env python3
"""Writes docs/api.md, pagewarden's API reference, from the importable package itself.

- Docstrings come from the objects: the Rust `///` comments of the native classes (PyO3 turns
  them into docstrings) and the docstrings of the Python modules.
- Typed signatures of the native module come from its stubs (`_native.pyi`, which stubtest
  keeps in line with the module); those of Python functions from their annotations.
- The command line comes from its argument parser (`pagewarden.cli.build_parser`).

Documented: every name in `pagewarden.__all__`, every public submodule except the CLI's own
implementation, and every `pagewarden` command. Nothing in the output depends on the machine,
the terminal or the Python version, so CI can regenerate it and compare.

    python scripts/gen_api_docs.py            # rewrite docs/api.md
    python scripts/gen_api_docs.py --check    # exit 1 (with a diff) if docs/api.md is stale
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib
import inspect
import pkgutil
import re
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pagewarden
import pagewarden._native
import pagewarden.cli

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "api.md"
# Submodules that implement commands rather than offer an API; the commands are documented.
CLI_MODULES = {"cli", "demo", "bench", "poison_tools", "kvm_check"}
# What a dunder method of a class means to its user.
DUNDER_SUPPORT = {
    "__contains__": "`x in obj`",
    "__len__": "`len(obj)`",
    "__iter__": "iteration",
    "__or__": "`a | b`",
    "__eq__": "`==`",
    "__enter__": "`with` (a context manager)",
}


def docstring(obj: object) -> str:
    """The cleaned docstring as Markdown (reST ``code`` becomes `code`), or ''."""
    doc = inspect.getdoc(obj) if not isinstance(obj, str) else obj
    if not doc:
        return ""
    return re.sub(r"``([^`]+)``", r"`\1`", doc).strip()


def slug(text: str) -> str:
    """The anchor a heading gets on the common Markdown hosts (and in check_docs.py)."""
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


# --------------------------------------------------------------------------------------------
# Signatures from the stubs


@dataclasses.dataclass
class StubClass:
    node: ast.ClassDef
    methods: dict[str, ast.FunctionDef]
    attributes: dict[str, str]


def load_stubs() -> tuple[dict[str, ast.FunctionDef], dict[str, StubClass]]:
    """Functions and classes of `_native.pyi`, by name."""
    path = Path(pagewarden._native.__file__ or "").with_name("_native.pyi")
    if not path.is_file():
        sys.exit(f"gen_api_docs: the stubs are missing: {path}")
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    functions: dict[str, ast.FunctionDef] = {}
    classes: dict[str, StubClass] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            functions[node.name] = node
        elif isinstance(node, ast.ClassDef):
            methods = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
            attributes = {
                n.target.id: ast.unparse(n.annotation)
                for n in node.body
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
            }
            classes[node.name] = StubClass(node, methods, attributes)
    return functions, classes


def is_property(node: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list)


def is_static(node: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)


@dataclasses.dataclass
class Signature:
    params: list[str]
    returns: str | None

    def render(self, name: str, prefix: str = "def ") -> str:
        """`def name(a: int, b: str = "x") -> bool`, one parameter a line when it is long."""
        tail = f" -> {self.returns}" if self.returns else ""
        line = f"{prefix}{name}({', '.join(self.params)}){tail}"
        if len(line) <= 88 or not self.params:
            return line
        body = "".join(f"    {param},\n" for param in self.params)
        return f"{prefix}{name}(\n{body}){tail}"


def param_text(name: str, annotation_text: str | None, default_text: str | None) -> str:
    text = name + (f": {annotation_text}" if annotation_text else "")
    if default_text is not None:
        text += f" = {default_text}" if annotation_text else f"={default_text}"
    return text


def stub_signature(node: ast.FunctionDef, drop_first: bool) -> Signature:
    """The signature of a stub, without self/cls when ``drop_first``."""
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults))
    defaults += list(args.defaults)
    params: list[str] = []
    for i, (arg, default) in enumerate(zip(positional, defaults, strict=True)):
        if drop_first and i == 0:
            continue
        ann = ast.unparse(arg.annotation) if arg.annotation is not None else None
        params.append(param_text(arg.arg, ann, ast.unparse(default) if default else None))
        if args.posonlyargs and arg is args.posonlyargs[-1]:
            params.append("/")
    if params == ["/"]:
        params = []
    if args.vararg is not None:
        ann = ast.unparse(args.vararg.annotation) if args.vararg.annotation else None
        params.append(param_text("*" + args.vararg.arg, ann, None))
    elif args.kwonlyargs:
        params.append("*")
    for arg, kw_default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        ann = ast.unparse(arg.annotation) if arg.annotation is not None else None
        params.append(param_text(arg.arg, ann, ast.unparse(kw_default) if kw_default else None))
    if args.kwarg is not None:
        ann = ast.unparse(args.kwarg.annotation) if args.kwarg.annotation else None
        params.append(param_text("**" + args.kwarg.arg, ann, None))
    returns = ast.unparse(node.returns) if node.returns is not None else None
    return Signature(params, returns)


# --------------------------------------------------------------------------------------------
# Signatures of Python functions


def annotation(value: object) -> str:
    if isinstance(value, str):
        return value
    return inspect.formatannotation(value)


def python_signature(func: Callable[..., Any], drop_first: bool = False) -> Signature:
    """The signature of a Python callable, with annotations as written in the source."""
    sig = inspect.signature(func)
    params = list(sig.parameters.values())
    if drop_first and params:
        params = params[1:]
    parts: list[str] = []
    star_seen = False
    for i, p in enumerate(params):
        if p.kind is p.KEYWORD_ONLY and not star_seen:
            parts.append("*")
            star_seen = True
        name = p.name
        if p.kind is p.VAR_POSITIONAL:
            name, star_seen = f"*{p.name}", True
        elif p.kind is p.VAR_KEYWORD:
            name = f"**{p.name}"
        ann = annotation(p.annotation) if p.annotation is not p.empty else None
        default = repr(p.default) if p.default is not p.empty else None
        if default is not None and " at 0x" in default:
            default = "..."  # an object's address would differ from run to run
        parts.append(param_text(name, ann, default))
        last_positional_only = p.kind is p.POSITIONAL_ONLY and (
            i + 1 == len(params) or params[i + 1].kind is not p.POSITIONAL_ONLY
        )
        if last_positional_only:
            parts.append("/")
    returns = None
    if sig.return_annotation is not sig.empty:
        returns = annotation(sig.return_annotation)
    return Signature(parts, returns)


def attribute_docs(cls: type) -> dict[str, tuple[str, str]]:
    """name -> (annotation, docstring) of the annotated class attributes in the source, with
    the string literal that follows each (the attribute docstring convention)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    node = ast.parse(inspect.cleandoc("\n" + source) if source[:1].isspace() else source).body[0]
    if not isinstance(node, ast.ClassDef):
        return {}
    found: dict[str, tuple[str, str]] = {}
    body = node.body
    for i, item in enumerate(body):
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            doc = ""
            nxt = body[i + 1] if i + 1 < len(body) else None
            if (
                isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                doc = docstring(nxt.value.value)
            found[item.target.id] = (ast.unparse(item.annotation), doc)
    return found


# --------------------------------------------------------------------------------------------
# Output


class Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.toc: list[tuple[int, str]] = []

    def heading(self, level: int, text: str, toc: bool = True) -> None:
        if self.lines and self.lines[-1] != "":
            self.lines.append("")
        self.lines += ["#" * level + " " + text, ""]
        if toc:
            self.toc.append((level, text))

    def para(self, text: str) -> None:
        if text:
            self.lines += [text, ""]

    def code(self, text: str, lang: str = "python signature") -> None:
        self.lines += [f"```{lang}", text, "```", ""]

    def text(self) -> str:
        while self.lines and self.lines[-1] == "":
            self.lines.pop()
        return "\n".join(self.lines) + "\n"


def native_members(cls: type, stub: StubClass) -> Iterator[tuple[str, ast.FunctionDef]]:
    """Public methods and properties of a native class, in stub order."""
    for name, node in stub.methods.items():
        if name.startswith("_"):
            continue
        if not hasattr(cls, name):
            sys.exit(f"gen_api_docs: the stubs name {cls.__name__}.{name}, the module has none")
        yield name, node


def supports(names: list[str]) -> str:
    found = [DUNDER_SUPPORT[n] for n in DUNDER_SUPPORT if n in names]
    return "Supports " + ", ".join(found) + "." if found else ""


def document_native_class(w: Writer, cls: type, stub: StubClass) -> None:
    w.heading(3, cls.__name__)
    new = stub.methods.get("__new__")
    if new is not None:
        constructor = stub_signature(new, drop_first=True)
        constructor.returns = None
        w.code(constructor.render(cls.__name__, prefix=""))
    w.para(docstring(cls))
    w.para(supports(list(stub.methods)))
    properties: list[str] = []
    for name, node in native_members(cls, stub):
        if is_property(node):
            returns = ast.unparse(node.returns) if node.returns is not None else "Any"
            doc = docstring(inspect.getattr_static(cls, name))
            properties.append(f"- `{name}: {returns}` (read-only)" + (f": {doc}" if doc else ""))
    if stub.attributes:
        for name, kind in stub.attributes.items():
            properties.append(f"- `{name}: {kind}`")
    if properties:
        w.para("Attributes:\n\n" + "\n".join(properties))
    for name, node in native_members(cls, stub):
        if is_property(node):
            continue
        static = is_static(node)
        w.heading(4, f"{cls.__name__}.{name}", toc=False)
        text = stub_signature(node, drop_first=not static).render(name)
        w.code(f"@staticmethod\n{text}" if static else text)
        w.para(docstring(getattr(cls, name)))


def document_function(w: Writer, name: str, func: Callable[..., Any], signature: Signature) -> None:
    w.heading(3, f"{name}()")
    w.code(signature.render(name))
    w.para(docstring(func))


def document_exception(w: Writer, cls: type, stub: StubClass | None) -> None:
    base = cls.__bases__[0]
    w.heading(3, cls.__name__)
    w.para(f"A subclass of `{base.__name__}`. " + docstring(cls))
    if stub is not None and stub.attributes:
        w.para("Attributes:\n\n" + "\n".join(f"- `{n}: {t}`" for n, t in stub.attributes.items()))


def document_python_class(w: Writer, cls: type, qualname: str) -> None:
    w.heading(3, qualname)
    if dataclasses.is_dataclass(cls):
        constructor = python_signature(cls)
        constructor.returns = None
        w.code(constructor.render(cls.__name__, prefix=""))
    w.para(docstring(cls) if cls.__doc__ else "")
    attrs = attribute_docs(cls)
    if attrs:
        w.para(
            "Attributes:\n\n"
            + "\n".join(f"- `{n}: {t}`" + (f": {d}" if d else "") for n, (t, d) in attrs.items())
        )
    for name, member in vars(cls).items():
        if name.startswith("_") or not inspect.isfunction(member):
            continue
        w.heading(4, f"{cls.__name__}.{name}", toc=False)
        w.code(python_signature(member, drop_first=True).render(name))
        w.para(docstring(member))


def public_submodules() -> list[types.ModuleType]:
    modules = []
    for info in sorted(pkgutil.iter_modules(pagewarden.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in CLI_MODULES:
            continue
        modules.append(importlib.import_module(f"pagewarden.{info.name}"))
    return modules


def module_names(module: types.ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and getattr(obj, "__module__", None) == module.__name__
    ]


def document_package(w: Writer) -> None:
    functions, classes = load_stubs()
    constants = {"DEFAULT_FAULT_AROUND"}
    names = sorted(set(pagewarden.__all__) - {"__version__"} - constants)
    objects = {name: getattr(pagewarden, name) for name in names}
    exceptions = [
        n for n in names if isinstance(objects[n], type) and issubclass(objects[n], BaseException)
    ]
    plain_classes = [n for n in names if isinstance(objects[n], type) and n not in exceptions]
    funcs = [n for n in names if callable(objects[n]) and not isinstance(objects[n], type)]
    missing = set(names) - set(exceptions) - set(plain_classes) - set(funcs)
    if missing:
        sys.exit(f"gen_api_docs: do not know how to document {sorted(missing)}")

    w.heading(2, "Module pagewarden")
    w.para(docstring(pagewarden))
    w.para(
        "`pagewarden.__version__` is the package version (also `pagewarden --version`). "
        f"`pagewarden.DEFAULT_FAULT_AROUND` ({pagewarden.DEFAULT_FAULT_AROUND}) is the largest "
        "fault-around window in bytes a `Handler` uses unless told otherwise. "
        "Every name below is importable from `pagewarden`."
    )
    w.heading(2, "Functions")
    for name in funcs:
        if name in functions:
            document_function(w, name, objects[name], stub_signature(functions[name], False))
        else:
            document_function(w, name, objects[name], python_signature(objects[name]))
    w.heading(2, "Classes")
    order = ["GuestMemory", "Handler", "PoisonSet", "FileSource", "MemorySource", "ZeroSource"]
    for name in sorted(plain_classes, key=lambda n: (order.index(n) if n in order else 99, n)):
        cls = objects[name]
        if name in classes:
            document_native_class(w, cls, classes[name])
        else:
            document_python_class(w, cls, name)
    w.heading(2, "Exceptions and warnings")
    root = [n for n in exceptions if n == "PagewardenError"]
    for name in root + [n for n in exceptions if n not in root]:
        document_exception(w, objects[name], classes.get(name))


def document_submodule(w: Writer, module: types.ModuleType) -> None:
    w.heading(2, f"Module {module.__name__}")
    w.para(docstring(module))
    for name in module_names(module):
        obj = getattr(module, name)
        if inspect.isclass(obj):
            document_python_class(w, obj, f"{module.__name__.split('.')[-1]}.{name}")
        elif inspect.isfunction(obj):
            qual = f"{module.__name__.split('.')[-1]}.{name}"
            w.heading(3, f"{qual}()")
            w.code(python_signature(obj).render(name))
            w.para(docstring(obj))


def argument_row(action: argparse.Action) -> tuple[str, str, str]:
    """(argument, default, help) of one parser action, as the CLI spells them."""
    metavar = action.metavar if isinstance(action.metavar, str) else None
    if action.choices is not None and metavar is None:
        metavar = "{" + ",".join(str(c) for c in action.choices) + "}"
    if not action.option_strings:
        name = metavar or action.dest
    elif isinstance(action, argparse.BooleanOptionalAction):
        name = " / ".join(action.option_strings)
    else:
        name = ", ".join(action.option_strings)
        if action.nargs != 0:
            name += " " + (metavar or action.dest.upper())
    if action.nargs in ("+", "*"):
        name += " ..."
    default = action.default
    shown = ""
    if isinstance(action, argparse.BooleanOptionalAction):
        shown = "on" if default else "off"
    elif default not in (None, False, argparse.SUPPRESS) and action.option_strings:
        shown = str(default)
    # argparse help strings may hold %-placeholders; some Python versions add the default
    # themselves. Spell them out the same way on every version.
    help_text = (action.help or "").removesuffix(" (default: %(default)s)")
    help_text = help_text.replace("%(default)s", str(default)).replace("%%", "%")
    return name, shown, help_text.replace("|", "\\|")


def document_parser(w: Writer, parser: argparse.ArgumentParser, words: list[str]) -> None:
    sub_actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    args = [
        a
        for a in parser._actions
        if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
    ]
    positionals = [argument_row(a)[0] for a in args if not a.option_strings]
    synopsis = " ".join([*words, *positionals])
    if any(a.option_strings for a in args):
        synopsis += " [options]"
    if sub_actions:
        synopsis += " COMMAND ..."
    w.heading(3, " ".join(words))
    w.code(synopsis, "text")
    if parser.description:
        w.para(parser.description)
    if args:
        rows = [argument_row(a) for a in args]
        table = ["| argument | default | meaning |", "|---|---|---|"]
        table += [f"| `{n}` | {f'`{d}`' if d else ''} | {h} |" for n, d, h in rows]
        w.para("\n".join(table))
    for sub in sub_actions:
        helps = {a.dest: a.help or "" for a in sub._choices_actions}
        w.para(
            "Commands:\n\n"
            + "\n".join(
                f"- [`{name}`](#{slug(' '.join([*words, name]))}): {helps.get(name, '')}"
                for name in sub.choices
            )
        )
        for name, subparser in sub.choices.items():
            document_parser(w, subparser, [*words, name])


def generate() -> str:
    w = Writer()
    document_package(w)
    for module in public_submodules():
        document_submodule(w, module)
    w.heading(2, "Command line")
    w.para(
        "Installed as the `pagewarden` console script; `python3 -m pagewarden` is the same. "
        "Every command exits 0 on success, 1 on an error (a one-line message on standard "
        "error), 2 on a usage error."
    )
    document_parser(w, pagewarden.cli.build_parser(), ["pagewarden"])

    head = [
        "# API reference",
        "",
        "<!-- Generated by scripts/gen_api_docs.py from the docstrings; do not edit by hand. -->",
        "",
        (
            "Generated from the docstrings of the package (the Rust `///` comments of the "
            "native classes), the typed signatures of its stubs and the command line's "
            "argument parser. CI regenerates this page and fails when it differs, so it "
            "describes the code as it is. The [concepts](concepts.md) explain the ideas; the "
            "[tutorial](tutorial.md) shows them at work."
        ),
        "",
        "## Contents",
        "",
    ]
    for level, text in w.toc:
        indent = "  " * (level - 2)
        head.append(f"{indent}- [{text}](#{slug(text)})")
    return "\n".join(head) + "\n\n" + w.text()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check", action="store_true", help="compare with docs/api.md instead of writing it"
    )
    args = parser.parse_args()
    text = generate()
    if not args.check:
        OUTPUT.write_text(text, encoding="utf-8")
        print(f"wrote {OUTPUT}")
        return 0
    current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
    if current == text:
        print(f"{OUTPUT.name} is up to date")
        return 0
    diff = list(
        difflib.unified_diff(
            current.splitlines(),
            text.splitlines(),
            "docs/api.md (checked in)",
            "docs/api.md (from the code)",
            lineterm="",
        )
    )
    print("\n".join(diff[:80]), file=sys.stderr)
    if len(diff) > 80:
        print(f"... {len(diff) - 80} more diff lines", file=sys.stderr)
    print(
        "gen_api_docs: docs/api.md does not match the docstrings and signatures in the code; "
        "run `python scripts/gen_api_docs.py` and commit docs/api.md",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
