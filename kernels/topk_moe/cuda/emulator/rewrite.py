"""The mechanical rewrites that let the host C++ compiler build a kernels/topk_moe/cuda `.cu` file.

Every rewrite keeps the line count of the text it replaces, so a compiler error
or an emulator fault names the real line of the real file. What changes:

- ``#include <cuda_fp16.h>`` (and ``<cuda_runtime.h>``): blanked; the
  force-included ``cuda_emulator.h`` provides what the kernels use.
- ``__shared__ T name[...];`` becomes a static reference into the block's shared
  arena (``emu::shared_variable``), which the emulator poisons before every block;
  ``extern __shared__ T name[];`` a pointer to the launch's dynamic shared memory.
- ``asm [volatile] ("opcode operands" : outputs : inputs : clobbers)`` becomes a
  call ``ptx_<opcode with dots as underscores>(operands in written order)``. Only
  the opcodes in ``PTX_OPCODES`` have such a function: any other is refused here,
  with the file and line, so unknown PTX never builds.
- After the last line, each ``extern "C" __global__`` kernel gets a launch entry
  ``emu_launch_<name>`` and ``emu_signature_<name>`` (its parameter types).

The rewrites find code by regular expressions on a copy of the text whose
comments and string literals are blanked, so nothing in a comment is rewritten.
"""

from __future__ import annotations

import re

#: The inline PTX the emulator implements (cuda_emulator.h, the ptx_* functions).
PTX_OPCODES = (
    "cvt.f32.f16",
    "cvt.rn.f16.f32",
    "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
    "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
    "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
    "cp.async.cg.shared.global",
    "cp.async.commit_group",
    "cp.async.wait_group",
)

BLANKED_INCLUDES = ("cuda_fp16.h", "cuda_runtime.h")

_KERNEL = re.compile(
    r'extern\s+"[ C]"\s+__global__\s+void\s+(?:__launch_bounds__\s*\((?P<bounds>[^()]*(?:\([^()]*\)[^()]*)*)\)\s*)?'
    r"(?P<name>[A-Za-z_]\w*)\s*\("
)
_SHARED = re.compile(r"(?P<extern>\bextern\s+)?\b__shared__\s+(?:__align__\s*\(\s*(?P<align>\d+)\s*\)\s+)?(?P<decl>[^;{}]*);")
_DECLARATOR = re.compile(r"^(?P<type>.*?)\b(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]]*\]\s*)+)$", re.DOTALL)
_ASM = re.compile(r"\basm\b\s*(?:volatile\b\s*)?\(")
_SYSTEM_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*<([^>]+)>[^\n]*$', re.MULTILINE)
_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.MULTILINE)


class RewriteError(ValueError):
    """A construct the emulator cannot build (unknown PTX, an odd declaration)."""


def blank_comments_and_strings(text: str) -> str:
    """``text`` with the inside of comments, string and character literals as spaces
    (newlines kept), so offsets and lines are those of ``text``."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            for k in range(i, j):
                out[k] = " "
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            for k in range(i, j):
                if text[k] != "\n":
                    out[k] = " "
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            for k in range(i + 1, min(j, n)):
                out[k] = " "
            i = j + 1
        else:
            i += 1
    return "".join(out)


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def kernel_names(text: str) -> list:
    """The ``extern "C" __global__`` kernels of a source, in order (comments ignored)."""
    return [m.group("name") for m in _KERNEL.finditer(blank_comments_and_strings(text))]


def local_includes(text: str) -> list:
    """The files of ``#include "name"`` lines (as the CuPy loader reads them)."""
    return _LOCAL_INCLUDE.findall(text)


def _matching_paren(masked: str, open_index: int) -> int:
    depth = 0
    for i in range(open_index, len(masked)):
        if masked[i] == "(":
            depth += 1
        elif masked[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise RewriteError("unbalanced parentheses")


def _split_top(text: str, masked: str, separator: str) -> list:
    """Split ``text`` at ``separator`` outside parentheses/braces/brackets (found on ``masked``)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(masked):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == separator and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _string_literals(text: str) -> str:
    return "".join(bytes(s, "utf-8").decode("unicode_escape") for s in re.findall(r'"((?:[^"\\]|\\.)*)"', text))


def _rewrite_asm(text: str, masked: str, start: int, end: int, file: str) -> str:
    """The call that replaces text[start:end] (one asm statement's ``asm ... ( ... )``)."""
    open_index = masked.index("(", start)
    inner, inner_masked = text[open_index + 1:end - 1], masked[open_index + 1:end - 1]
    sections = _split_top(inner, inner_masked, ":")
    line = line_of(text, start)
    template = _string_literals(sections[0]).strip()
    operands = []  # (constraint, expression) in %N order: outputs, then inputs
    for section in sections[1:3]:
        section_masked = blank_comments_and_strings(section)
        for operand in _split_top(section, section_masked, ","):
            operand = operand.strip()
            if not operand:
                continue
            match = re.match(r'"([^"]*)"\s*\((.*)\)$', operand, re.DOTALL)
            if not match:
                raise RewriteError(f"{file}:{line}: cannot read the asm operand {operand!r}")
            operands.append((match.group(1), match.group(2).strip()))
    statement = template.rstrip().rstrip(";").strip()
    if ";" in statement:
        raise RewriteError(f"{file}:{line}: one PTX instruction per asm statement, got {template!r}")
    opcode, _, rest = statement.partition(" ")
    opcode = opcode.strip()
    if opcode not in PTX_OPCODES:
        raise RewriteError(f"{file}:{line}: the CUDA emulator does not implement the PTX instruction "
                           f"{opcode!r} (it implements {', '.join(PTX_OPCODES)})")
    arguments = []
    for token in re.split(r"[\s,{}\[\]]+", rest):
        if not token:
            continue
        if token.startswith("%"):
            index = int(token[1:])
            if index >= len(operands):
                raise RewriteError(f"{file}:{line}: %{index} names no operand")
            arguments.append(f"({operands[index][1]})")
        elif re.fullmatch(r"-?\d+", token):
            arguments.append(token)
        else:
            raise RewriteError(f"{file}:{line}: unexpected PTX operand {token!r} in {template!r}")
    newlines = "\n" * text.count("\n", start, end)
    return f"ptx_{opcode.replace('.', '_')}({', '.join(arguments)}{newlines})"


def _rewrite_shared(match: re.Match, file: str, text: str) -> str:
    decl = match.group("decl")
    align = int(match.group("align") or 0)
    if match.group("extern"):
        m = re.match(r"^(?P<type>.*?)\b(?P<name>[A-Za-z_]\w*)\s*\[\s*\]\s*$", decl, re.DOTALL)
        if not m:
            raise RewriteError(f"{file}:{line_of(text, match.start())}: cannot read extern __shared__ {decl!r}")
        kind = m.group("type").strip()
        return f"{kind}* const {m.group('name')} = reinterpret_cast<{kind}*>(emu::dynamic_shared());"
    m = _DECLARATOR.match(decl.strip())
    if not m:
        m2 = re.match(r"^(?P<type>.*?)\b(?P<name>[A-Za-z_]\w*)\s*$", decl.strip(), re.DOTALL)
        if not m2:
            raise RewriteError(f"{file}:{line_of(text, match.start())}: cannot read __shared__ {decl!r}")
        kind, name = m2.group("type").strip(), m2.group("name")
        newlines = "\n" * decl.count("\n")
        return f"static {kind}& {name} = emu::shared_variable<{kind}, {align}>();{newlines}"
    kind, name, dims = m.group("type").strip(), m.group("name"), m.group("dims")
    flat_dims = "".join(f"[({d})]" for d in re.findall(r"\[([^\]]*)\]", dims))
    newlines = "\n" * (decl.count("\n") - dims.count("\n"))
    return f"static {kind} (&{name}){dims} = emu::shared_variable<{kind}{flat_dims}, {align}>();{newlines}"


def rewrite(text: str, file: str) -> str:
    """The text g++ compiles for ``file`` (same number of lines, plus the launch entries)."""
    masked = blank_comments_and_strings(text)
    edits = []  # (start, end, replacement)
    for match in _SYSTEM_INCLUDE.finditer(text):
        if match.group(1).strip() in BLANKED_INCLUDES:
            edits.append((match.start(), match.end(), f"// {match.group(1)}: provided by cuda_emulator.h"))
    for match in _SHARED.finditer(masked):
        original = re.match(_SHARED.pattern, text[match.start():match.end()])
        edits.append((match.start(), match.end(), _rewrite_shared(original, file, text)))
    for match in _ASM.finditer(masked):
        end = _matching_paren(masked, match.end() - 1) + 1
        edits.append((match.start(), end, _rewrite_asm(text, masked, match.start(), end, file)))
    edits.sort()
    pieces, position = [], 0
    for start, end, replacement in edits:
        if start < position:
            raise RewriteError(f"{file}:{line_of(text, start)}: overlapping rewrites")
        pieces.append(text[position:start])
        pieces.append(replacement)
        position = end
    pieces.append(text[position:])
    result = "".join(pieces)
    assert result.count("\n") == text.count("\n"), "a rewrite changed the line count"

    entries = ["\n// ---- emulator launch entries (generated by kernels/topk_moe/cuda/emulator/rewrite.py)"]
    for match in _KERNEL.finditer(masked):
        name = match.group("name")
        bounds = match.group("bounds")
        first_bound = _split_top(bounds, bounds, ",")[0].strip() if bounds else "0"
        entries.append(
            f'extern "C" int emu_launch_{name}(const emu::LaunchConfig* config, void** args, char* error, int size) {{\n'
            f"    emu::kernel_args = args;\n"
            f'    return emu::launch(config, "{name}", (long long)({first_bound}),\n'
            f"                       [](emu::Thread*) {{ emu::call_kernel({name}, emu::kernel_args); }}, error, size);\n"
            f"}}\n"
            f'extern "C" const char* emu_signature_{name}() {{ return emu::signature({name}); }}'
        )
    return result + "\n".join(entries) + "\n"
