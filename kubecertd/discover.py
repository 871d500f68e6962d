"""How kubelet is run on this node, read from its systemd unit the way an operator would.

``systemctl cat kubelet`` shows the unit file, its drop-ins and the ``EnvironmentFile=``s
they name; ``ExecStart=`` with its variables expanded is kubelet's command line, and its
flags say where the credentials are.  ``read_unit`` is the thin shell that finds and reads
those files; everything it concludes is decided by the pure functions it calls:
``parse_unit``, ``parse_environment_file``, ``expand`` and ``kubelet_flags``.

Facts this module follows, from systemd's man pages and sources; tests/test_discover.py
checks the result against a real systemd 252 (Debian 12's), and where upstream has since
changed (comments in environment files, v254) this module does what 252 does:

- Search path and precedence: ``systemd-analyze unit-paths`` and systemd.unit(5) "UNIT FILE
  LOAD PATH"; the first directory holding the unit file wins, and a unit file that is empty
  or a symlink to /dev/null is masked.  Drop-ins: systemd/systemd src/shared/dropin.c
  ``unit_file_find_dropin_paths`` collects ``<dir>/<name>.d/*.conf`` for every search
  directory, the dash-prefix names (``k3s-.service.d`` for ``k3s-agent.service``) and the
  top-level ``service.d``; src/basic/conf-files.c keeps the first file of each name in that
  order (so /etc masks /usr/lib) and applies them sorted by file name.
- File syntax: src/shared/conf-parser.c ``config_parse``: ``#``/``;`` comment lines are
  dropped even inside a continuation, a trailing unescaped backslash joins the next line
  with a space, and ``[Section]``/``Key=Value`` are trimmed.
- ``ExecStart=``: src/core/load-fragment.c ``config_parse_exec`` and systemd.service(5)
  "COMMAND LINES": words are unquoted with C escapes (src/basic/extract-word.c, quotes may
  open mid-word), a lone ``;`` separates commands and ``\\;`` is a literal ``;``, the
  prefixes ``-@:+!`` are stripped, an empty assignment resets the list.
- Expansion: src/basic/env-util.c ``replace_env_argv``: a whole word ``$NAME`` becomes the
  variable split into words (quotes honoured, then removed), or nothing; ``${NAME}`` is
  replaced inside a word without splitting; ``$$`` is ``$``; anything else stays literal.
- ``EnvironmentFile=``: src/basic/env-file.c ``parse_env_file_internal`` (shell-like quoting,
  no ``export``: such a line has an invalid name and is dropped) and src/core/execute.c
  ``exec_context_load_environment`` (paths are globbed; with ``-`` any failure is ignored;
  the files override ``Environment=``).
- Flags: spf13/pflag ``parseLongArg``; kubelet parses with ``WordSepNormalizeFunc``
  (``_`` equals ``-``) and refuses positional words ("unknown command").

Not modelled: template units (``foo@bar.service``), specifiers that need the host (``%H``,
``%m``, ...: left as written), and the manager's own environment (``$PATH``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

# systemd 252's system search path, highest priority first, as ``systemd-analyze unit-paths``
# prints it on Debian 12 (systemd.unit(5) "UNIT FILE LOAD PATH").  The .control dirs hold
# ``systemctl set-property`` drop-ins; /lib and /usr/lib are one directory on merged-/usr.
UNIT_DIRS = (
    "/etc/systemd/system.control",
    "/run/systemd/system.control",
    "/run/systemd/transient",
    "/run/systemd/generator.early",
    "/etc/systemd/system",
    "/etc/systemd/system.attached",
    "/run/systemd/system",
    "/run/systemd/system.attached",
    "/run/systemd/generator",
    "/usr/local/lib/systemd/system",
    "/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/run/systemd/generator.late",
)

# No unit, drop-in or environment file comes near this; anything larger is not one.
MAX_FILE_BYTES = 1 << 20

_WHITESPACE = " \t\n\r"  # systemd's WHITESPACE
_GLOB_MAGIC = frozenset("*?[")
_MAX_SYMLINKS = 40  # the kernel's (and systemd chase()'s) limit


class UnitSettings(NamedTuple):
    """What a unit's files say about its main command, before expansion."""

    # The one command left after drop-ins, as (path, arg, ...): an empty ExecStart= clears
    # the list and the last command wins.  The '@' prefix's argv[0] word is dropped; with
    # the ':' prefix (no expansion) each '$' of the arguments is doubled, so that
    # ``expand`` gives them back verbatim.
    exec_start: tuple[str, ...]
    environment: tuple[tuple[str, str], ...]  # Environment= assignments in order
    environment_files: tuple[tuple[str, bool], ...]  # (path, optional) per EnvironmentFile=


class KubeletFlags(NamedTuple):
    kubeconfig: str | None
    bootstrap_kubeconfig: str | None
    cert_dir: str | None
    config: str | None  # KubeletConfiguration file (--config)
    hostname_override: str | None
    rotate_certificates: bool | None  # deprecated flag: True/False when given, else None


class KubeletUnit(NamedTuple):
    unit: str  # e.g. "kubelet.service"
    files: tuple[str, ...]  # every file read: unit, drop-ins, environment files, in order
    argv: tuple[str, ...]  # ExecStart after expansion
    flags: KubeletFlags
    # Files the unit has or needs that could not be read: a required EnvironmentFile= that
    # is missing (systemd would refuse to start the unit), or any unit file, drop-in or
    # environment file that exists but is unreadable or over MAX_FILE_BYTES.
    unread: tuple[str, ...] = ()


class KubeletConfig(NamedTuple):
    path: str
    rotate_certificates: bool | None  # rotateCertificates


NO_FLAGS = KubeletFlags(None, None, None, None, None, None)


# --- unit files --------------------------------------------------------------------------


def parse_unit(files: Sequence[tuple[str, str]], unit: str = "") -> UnitSettings:
    """The [Service] settings of a unit file followed by its drop-ins, as systemd applies them.

    ``files`` is (path, text) of the unit file, then of each drop-in in the order systemd
    applies them.  ``unit`` (e.g. "k3s-agent.service") resolves the specifiers that depend
    on the unit's name (``%n %N %p %i %j``); unknown specifiers are left as written.  A
    setting systemd would reject (unbalanced quotes, a relative EnvironmentFile=) is ignored;
    systemd refuses the whole unit for an unbalanced quote after ExecStart='s first word.
    """
    commands: list[tuple[str, ...]] = []
    environment: list[tuple[str, str]] = []
    environment_files: list[tuple[str, bool]] = []
    for _path, text in files:
        section: str | None = None  # each file starts outside any section
        for line in _logical_lines(text):
            if line.startswith("["):
                section = line[1:-1] if len(line) > 1 and line.endswith("]") else None
                continue
            key, equals, value = line.partition("=")
            key = key.strip(_WHITESPACE)
            if section != "Service" or not equals or not key:
                continue
            value = value.strip(_WHITESPACE)
            if key == "ExecStart":
                commands = commands + _exec_commands(value, unit) if value else []
            elif key == "Environment":
                environment = environment + _assignments(value, unit) if value else []
            elif key == "EnvironmentFile":
                if not value:
                    environment_files = []
                elif (entry := _environment_file(value, unit)) is not None:
                    environment_files.append(entry)
    return UnitSettings(
        commands[-1] if commands else (), tuple(environment), tuple(environment_files)
    )


def _logical_lines(text: str) -> list[str]:
    """conf-parser.c ``config_parse``: lines joined at trailing backslashes, comments dropped,
    trimmed, empty ones left out."""
    lines: list[str] = []
    continuation: str | None = None
    # read_line(): CR, LF, CRLF or NUL end a line
    unified = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    for raw in unified.replace("\0", "\n").split("\n"):
        stripped = raw.lstrip(_WHITESPACE)
        if stripped[:1] in ("#", ";"):  # even inside a continuation (systemd.syntax(7))
            continue
        line = raw if continuation is None else continuation + raw
        if _ends_in_backslash(line):
            continuation = line[:-1] + " "
            continue
        continuation = None
        lines.append(line)
    if continuation is not None:
        lines.append(continuation)
    return [s for line in lines if (s := line.strip(_WHITESPACE))]


def _ends_in_backslash(line: str) -> bool:
    trailing = len(line) - len(line.rstrip("\\"))
    return trailing % 2 == 1


def _exec_commands(value: str, unit: str) -> list[tuple[str, ...]]:
    """The commands of one ExecStart= line (load-fragment.c ``config_parse_exec``)."""
    commands: list[tuple[str, ...]] = []
    text, at = value, 0
    while True:
        try:
            first, at = _word(text, at, unescape=True, relax=False)
        except _UnbalancedQuotesError:
            return commands
        if first is None:
            return commands
        prefixes, path = _split_prefixes(first)
        path = _specifiers(path, unit)
        if not path:
            return commands  # "-" or "@" alone: systemd logs "Empty path" and ignores it
        args: list[str] = []
        more = False
        while at < len(text):
            rest = text[at:]
            if rest[0] == ";" and rest[1:2] in ("", *_WHITESPACE):
                at = _skip_space(text, at + 1)
                more = True
                break
            if rest.startswith("\\;") and rest[2:3] in ("", *_WHITESPACE):
                args.append(";")
                at = _skip_space(text, at + 2)
                continue
            try:
                word, at = _word(text, at, unescape=True, relax=False)
            except _UnbalancedQuotesError:
                return commands  # systemd rejects the line
            if word is None:
                break
            args.append(_specifiers(word, unit))
        if "@" in prefixes:
            if not args:
                return commands  # "Empty executable name or zeroeth argument"
            args = args[1:]  # argv[0] for the process, not an argument
        if ":" in prefixes:
            args = [arg.replace("$", "$$") for arg in args]
        commands.append((path, *args))
        if not more:
            return commands


def _split_prefixes(word: str) -> tuple[str, str]:
    """The special executable prefixes (systemd.service(5) table 1) and the path after them."""
    prefixes = ""
    for at, char in enumerate(word):
        privileges = prefixes.count("+") + prefixes.count("!")
        allowed = (
            (char in "-@:" and char not in prefixes)
            or (char == "+" and not privileges)
            or (char == "!" and "+" not in prefixes and privileges < 2)  # "!!" as well
        )
        if not allowed:
            return prefixes, word[at:]
        prefixes += char
    return prefixes, ""


def _assignments(value: str, unit: str) -> list[tuple[str, str]]:
    """Environment= (load-fragment.c ``config_parse_environ``): quoted words NAME=VALUE;
    words with no '=' or an invalid name are skipped, and so is everything from an
    unbalanced quote on."""
    pairs: list[tuple[str, str]] = []
    at = 0
    while True:
        try:
            word, at = _word(value, at, unescape=True, relax=False)
        except _UnbalancedQuotesError:
            return pairs
        if word is None:
            return pairs
        name, equals, assigned = _specifiers(word, unit).partition("=")
        if equals and _valid_name(name):
            pairs.append((name, assigned))


def _environment_file(value: str, unit: str) -> tuple[str, bool] | None:
    """EnvironmentFile=: no unquoting; '-' marks it optional; only absolute paths count."""
    path = _specifiers(value, unit)
    optional = path.startswith("-")
    path = path.removeprefix("-")
    if not path.startswith("/"):
        return None  # "Path ... is not absolute, ignoring"
    return "/" + "/".join(p for p in path.split("/") if p not in ("", ".")), optional


# Specifiers that need nothing but the unit's name, and the system manager's fixed dirs.
_FIXED_SPECIFIERS = {
    "%": "%",
    "t": "/run",
    "S": "/var/lib",
    "C": "/var/cache",
    "L": "/var/log",
    "E": "/etc",
    "T": "/tmp",  # noqa: S108 - the specifier's value for the system manager, not a temp file
    "V": "/var/tmp",  # noqa: S108 - likewise
}


def _specifiers(text: str, unit: str) -> str:
    """systemd.unit(5) "SPECIFIERS", for those known without asking the host."""
    if "%" not in text:
        return text
    known = dict(_FIXED_SPECIFIERS)
    if unit:
        base, _, _suffix = unit.rpartition(".")
        prefix, _, instance = base.partition("@")
        known.update(n=unit, N=base, p=prefix, i=instance, j=prefix.rpartition("-")[2])
    out: list[str] = []
    at = 0
    while at < len(text):
        char = text[at]
        if char == "%" and at + 1 < len(text) and text[at + 1] in known:
            out.append(known[text[at + 1]])
            at += 2
        else:
            out.append(char)
            at += 1
    return "".join(out)


def _valid_name(name: str) -> bool:
    """env-util.c ``env_name_is_valid``: ASCII letters, digits and '_', no leading digit."""
    return name.isascii() and name.replace("_", "a").isalnum() and not name[0].isdigit()


# --- words: extract-word.c ---------------------------------------------------------------


class _UnbalancedQuotesError(Exception):
    """A quote without its closing quote, where systemd does not relax; never escapes here."""


_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
    "'": "'",
    "s": " ",
}
_HEX = "0123456789abcdefABCDEF"


def _unescape_one(text: str, at: int) -> tuple[str, int] | None:
    """escape.c ``cunescape_one`` at text[at] (the character after a backslash): the
    character and how many were used, or None for an escape systemd does not know."""
    char = text[at]
    if char in _ESCAPES:
        return _ESCAPES[char], 1
    digits = {"x": 2, "u": 4, "U": 8}.get(char)
    if digits is not None:
        code = text[at + 1 : at + 1 + digits]
        if len(code) != digits or any(c not in _HEX for c in code):
            return None
        value = int(code, 16)
        if value == 0 or value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
            return None
        return chr(value), digits + 1
    code = text[at : at + 3]
    if len(code) == 3 and all(c in "01234567" for c in code) and code[0] <= "3":
        value = int(code, 8)
        return (chr(value), 3) if value else None
    return None


def _word(text: str, at: int, *, unescape: bool, relax: bool) -> tuple[str | None, int]:
    """``extract_first_word(WHITESPACE, UNQUOTE [| CUNESCAPE] [| RELAX])`` from text[at:]:
    the word (None at the end) and where the next one starts.  Unknown C escapes are kept
    verbatim, as ``extract_first_word_and_warn`` does on its retry."""
    at = _skip_space(text, at)
    if at >= len(text):
        return None, at
    out: list[str] = []
    quote = ""
    while at < len(text):
        char = text[at]
        if char == "\\":
            if at + 1 >= len(text):
                if quote and not relax:
                    raise _UnbalancedQuotesError
                if unescape and not quote:
                    out.append("\\")  # a trailing backslash is kept (UNESCAPE_RELAX)
                at += 1
                break
            if unescape:
                known = _unescape_one(text, at + 1)
                if known is None:
                    out.append("\\" + text[at + 1])
                    at += 2
                else:
                    out.append(known[0])
                    at += 1 + known[1]
            else:
                out.append(text[at + 1])
                at += 2
        elif quote:
            if char == quote:
                quote = ""
            else:
                out.append(char)
            at += 1
        elif char in "'\"":
            quote = char
            at += 1
        elif char in _WHITESPACE:
            break
        else:
            out.append(char)
            at += 1
    if quote and not relax:
        raise _UnbalancedQuotesError
    return "".join(out), _skip_space(text, at)


def _words(text: str, *, unescape: bool, relax: bool) -> list[str]:
    words: list[str] = []
    at = 0
    while True:
        word, at = _word(text, at, unescape=unescape, relax=relax)
        if word is None:
            return words
        words.append(word)


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in _WHITESPACE:
        at += 1
    return at


# --- environment files and expansion -----------------------------------------------------


def parse_environment_file(text: str) -> dict[str, str]:
    """An EnvironmentFile= (env-file.c ``parse_env_file_internal``), later keys winning.

    ``KEY=VALUE`` per line; ``#`` or ``;`` first on a line starts a comment.  An unquoted
    value keeps its inner whitespace and quotes, loses its outer whitespace, and a backslash
    keeps the next character (or joins the next line).  '...' is verbatim and "..." knows
    the escapes \\" \\\\ \\` \\$; both may span lines.  Lines without '=', and names that are
    not valid (``export FOO=bar`` has the name "export FOO"), are dropped, as systemd does.
    """
    result: dict[str, str] = {}
    key: list[str] = []
    value: list[str] = []
    value_end = 0  # length of value without its trailing unquoted whitespace
    state = "pre-key"
    for char in text.split("\0", 1)[0]:  # systemd reads a C string
        newline = char in "\n\r"
        if state == "pre-key":
            if char in "#;":
                state = "comment"
            elif char not in _WHITESPACE:
                key, value, value_end, state = [char], [], 0, "key"
        elif state == "key":
            if newline:
                state = "pre-key"
            elif char == "=":
                state = "pre-value"
            else:
                key.append(char)
        elif state == "pre-value":
            if newline:
                _store(result, key, value, len(value))
                state = "pre-key"
            elif char == "'":
                state = "single"
            elif char == '"':
                state = "double"
            elif char == "\\":
                state = "value-escape"
            elif char not in _WHITESPACE:
                value.append(char)
                value_end = len(value)
                state = "value"
        elif state == "value":
            if newline:
                _store(result, key, value, value_end)
                state = "pre-key"
            elif char == "\\":
                state = "value-escape"
            else:
                value.append(char)
                if char not in _WHITESPACE:
                    value_end = len(value)
        elif state == "value-escape":
            if not newline:  # an escaped newline joins the lines
                value.append(char)
                value_end = len(value)
            state = "value"
        elif state == "single":
            if char == "'":
                state = "pre-value"
            else:
                value.append(char)
        elif state == "double":
            if char == '"':
                state = "pre-value"
            elif char == "\\":
                state = "double-escape"
            else:
                value.append(char)
        elif state == "double-escape":
            if char in '"\\`$':
                value.append(char)
            elif char != "\n":
                value.extend(("\\", char))  # kept, as a shell keeps it
            state = "double"
        elif state == "comment":
            if char == "\\":
                state = "comment-escape"
            elif newline:
                state = "pre-key"
        elif state == "comment-escape":
            state = "comment"  # systemd < 254: a backslash-newline continues the comment
    if state == "value":
        _store(result, key, value, value_end)
    elif state not in ("pre-key", "key", "comment", "comment-escape"):
        _store(result, key, value, len(value))
    return result


def _store(result: dict[str, str], key: list[str], value: list[str], end: int) -> None:
    name = "".join(key).rstrip(_WHITESPACE)
    if _valid_name(name):  # strv_env_clean_with_callback drops the rest
        result[name] = "".join(value[:end]) if end < len(value) else "".join(value)


def expand(words: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """ExecStart= arguments with variables expanded (env-util.c ``replace_env_argv``).

    A word that is ``$NAME`` becomes the value split at whitespace (quotes in the value
    group and are removed), or no word at all when NAME is unset or not a valid name.
    ``${NAME}`` is replaced anywhere in a word, whitespace and all; ``$$`` is ``$``; any
    other ``$`` (``$NAME`` inside a word, ``${A:-b}``) stays as written.
    """
    out: list[str] = []
    for word in words:
        if word.startswith("$") and word[1:2] not in ("{", "$"):
            name = word[1:]
            if _valid_name(name) and name in env:
                out.extend(_words(env[name], unescape=False, relax=True))
            continue
        out.append(_replace_env(word, env))
    return out


def _replace_env(word: str, env: Mapping[str, str]) -> str:
    """env-util.c ``replace_env_full`` with no flags: ``${NAME}`` and ``$$``."""
    out: list[str] = []
    start = 0  # first character not yet copied
    state = "word"
    for at, char in enumerate(word):
        if state == "word":
            if char == "$":
                state = "dollar"
        elif state == "dollar":
            if char == "{":
                out.append(word[start : at - 1])
                start = at - 1
                state = "variable"
            elif char == "$":
                out.append(word[start:at])
                start = at + 1
                state = "word"
            else:
                state = "word"
        elif char == "}":
            name = word[start + 2 : at]
            out.append(env.get(name, "") if _valid_name(name) else "")
            start = at + 1
            state = "word"
        elif char == ":":
            state = "word"  # ${NAME:-default} is not understood here: kept literally
    out.append(word[start:])
    return "".join(out)


# --- kubelet's and k3s's flags -----------------------------------------------------------

# The kubelet flags this module reads, by pflag name.  Every other flag is skipped; a flag we
# do not know takes the next word as its value unless that word starts with "-": pflag's own
# rule for unknown flags (``stripUnknownFlagValue``), and exact for any command line kubelet
# accepts, since kubelet refuses a stray positional word ("unknown command").
_VALUE_FLAGS = ("kubeconfig", "bootstrap-kubeconfig", "cert-dir", "config", "hostname-override")
_BOOL_FLAGS = ("rotate-certificates",)


def kubelet_flags(argv: Sequence[str]) -> KubeletFlags:
    """The flags kubecertd needs from kubelet's command line, parsed as kubelet's pflag does.

    ``argv`` may start with the program (any word not starting with "-" is skipped, as
    kubelet would reject it).  ``--flag=value`` and ``--flag value``; ``--cert_dir`` is
    ``--cert-dir``; the last occurrence wins; ``--`` ends the flags.  Single-dash words are
    shorthands: kubelet has only ``-h`` and ``-v`` (which takes a value, ``-v 2``), so
    ``-kubeconfig=...`` is not the kubeconfig (kubelet exits with "unknown shorthand flag").
    ``--rotate-certificates`` alone is true and never takes the next word; a value Go's
    ``strconv.ParseBool`` refuses gives None.
    """
    values: dict[str, str] = {}
    at = 0
    while at < len(argv):
        arg = argv[at]
        at += 1
        if arg == "--":
            break
        if len(arg) < 2 or arg[0] != "-":
            continue
        if arg[1] != "-":
            if arg == "-v" and at < len(argv):
                at += 1
            continue
        name, equals, value = arg[2:].partition("=")
        if not name or name[0] in "-=":
            continue  # pflag: "bad flag syntax"
        name = name.replace("_", "-")
        if name in _BOOL_FLAGS:
            values[name] = value if equals else "true"
        elif name in _VALUE_FLAGS:
            if equals:
                values[name] = value
            elif at < len(argv):
                values[name] = argv[at]
                at += 1
        elif not equals and at < len(argv) and not argv[at].startswith("-"):
            at += 1
    rotate = values.get("rotate-certificates")
    return KubeletFlags(
        kubeconfig=values.get("kubeconfig"),
        bootstrap_kubeconfig=values.get("bootstrap-kubeconfig"),
        cert_dir=values.get("cert-dir"),
        config=values.get("config"),
        hostname_override=values.get("hostname-override"),
        rotate_certificates=None if rotate is None else _go_bool(rotate),
    )


def _go_bool(text: str) -> bool | None:
    """Go's ``strconv.ParseBool``."""
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    return None


def k3s_flags(argv: Sequence[str]) -> tuple[str | None, str | None]:
    """(``--data-dir``/``-d``, ``--node-name``) of a ``k3s``/``rke2`` ``agent``/``server``
    command line, or None for each flag not given.

    k3s and RKE2 parse with urfave/cli on Go's flag package: one or two dashes,
    ``-d=/x`` or ``-d /x``, the last occurrence wins, ``--`` ends the flags.  Not read
    here: /etc/rancher/k3s/config.yaml (/etc/rancher/rke2/config.yaml) and its
    config.yaml.d/, which can set both, and ``$K3S_NODE_NAME``/``$RKE2_NODE_NAME``, which
    set the node name when the flag is absent.  With neither, the data dir is
    /var/lib/rancher/k3s (/var/lib/rancher/rke2) and the node name is the hostname;
    ``--with-node-id`` appends an id to it.  The embedded kubelet's own flags are the ``--kubelet-arg`` values.
    """
    data_dir: str | None = None
    node: str | None = None
    at = 0
    while at < len(argv):
        arg = argv[at]
        at += 1
        if arg == "--":
            break
        if len(arg) < 2 or arg[0] != "-":
            continue
        name, equals, value = arg[2 if arg[1] == "-" else 1 :].partition("=")
        if not name or name[0] in "-=":
            continue
        if name in ("data-dir", "d", "node-name"):
            if not equals:
                if at >= len(argv):
                    continue
                value = argv[at]
                at += 1
            if name == "node-name":
                node = value
            else:
                data_dir = value
        elif not equals and at < len(argv) and not argv[at].startswith("-"):
            at += 1  # an unknown flag's value, by the rule kubelet_flags explains
    return data_dir, node


# --- KubeletConfiguration and node name --------------------------------------------------


def parse_kubelet_config(text: bytes, path: str) -> KubeletConfig:
    """The fields kubecertd needs from a KubeletConfiguration file (YAML or JSON).

    Raises ValueError naming ``path`` for a file kubelet would refuse: empty, not YAML or
    JSON, not a mapping, another ``kind``, or a ``rotateCertificates`` that is not a boolean.
    """
    if not text.strip():
        raise ValueError(f"{path}: the KubeletConfiguration file is empty")
    document = _load_document(text, path)
    if not isinstance(document, dict):
        raise ValueError(f"{path}: not a KubeletConfiguration (the file is not a mapping)")
    kind = document.get("kind")
    if kind is not None and kind != "KubeletConfiguration":
        raise ValueError(f"{path}: kind is {kind!r}, not 'KubeletConfiguration'")
    rotate = document.get("rotateCertificates")
    if rotate is not None and not isinstance(rotate, bool):
        raise ValueError(f"{path}: rotateCertificates is {rotate!r}, not true or false")
    return KubeletConfig(path, rotate)


def _load_document(text: bytes, path: str) -> object:
    """JSON when it parses as JSON (the common case, quick), else YAML: what kubelet's
    sigs.k8s.io/yaml reads, ``{kind: KubeletConfiguration}`` included."""
    if text.lstrip().startswith(b"{"):
        import json  # noqa: PLC0415 - only a JSON config pays for it

        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            pass  # YAML's flow style starts with "{" too
    import yaml  # noqa: PLC0415 - PyYAML is slow to import; only --config files need it

    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as exc:
        # ValueError: PyYAML builds timestamps with datetime, and 2001-13-01 raises
        raise ValueError(f"{path}: not valid YAML or JSON: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# Go's unicode.IsSpace, which strings.TrimSpace uses.
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"


def node_name(flags: KubeletFlags | None, hostname: str) -> str:
    """kubelet's node name (component-helpers ``GetHostname``): a non-empty
    ``--hostname-override``, else the hostname; then TrimSpace and ToLower.

    "" means kubelet would refuse to start ("empty hostname is invalid").  A legacy in-tree
    ``--cloud-provider`` may replace the name; that is not known from the flags.
    """
    override = flags.hostname_override if flags is not None else None
    return (override or hostname).strip(_GO_SPACE).lower()


# --- the thin I/O shell ------------------------------------------------------------------


class _Read(NamedTuple):
    data: bytes | None  # None unless state is "ok"
    state: str  # "ok", "missing", "masked" (empty or /dev/null) or "unreadable"


def read_unit(unit: str, root: str = "/") -> KubeletUnit | None:
    """kubelet's command line as systemd would run ``unit``, from the files under ``root``.

    None when no search directory has the unit file, or it is masked.  Reading never
    raises: a file that cannot be read is left out and listed in ``unread``.  A missing
    optional ('-') EnvironmentFile= is skipped, as systemd skips it; a missing required one
    is listed in ``unread`` (systemd would refuse to start the unit) and the command line is
    still expanded without it, so the report can show both.
    """
    name = unit if "." in unit else unit + ".service"
    fragment = _find_fragment(name, root)
    if fragment is None:
        return None
    path, found = fragment
    if found.state == "masked":
        return None
    files: list[str] = []
    unread: list[str] = []
    texts: list[tuple[str, str]] = []
    for dropin_path, read in [(path, found), *_dropins(name, root)]:
        if read.data is not None:
            files.append(dropin_path)
            texts.append((dropin_path, read.data.decode("utf-8", "replace")))
        elif read.state == "unreadable":
            unread.append(dropin_path)
    settings = parse_unit(texts, name)
    env = dict(settings.environment)
    for pattern, optional in settings.environment_files:
        for env_path in _glob(pattern, root):
            read = _read(env_path, root)
            if read.state == "masked":
                read = _Read(b"", "ok")
            if read.data is None:
                if read.state == "unreadable" or not optional:
                    unread.append(env_path)
                continue
            files.append(env_path)
            env.update(parse_environment_file(read.data.decode("utf-8", "replace")))
    command = settings.exec_start
    argv = (command[0], *expand(command[1:], env)) if command else ()
    return KubeletUnit(name, tuple(files), argv, kubelet_flags(argv), tuple(unread))


def _find_fragment(name: str, root: str) -> tuple[str, _Read] | None:
    """The unit file of the first search directory that has one."""
    for directory in UNIT_DIRS:
        path = f"{directory}/{name}"
        read = _read(path, root)
        if read.state != "missing":
            return path, read
    return None


def _dropin_names(name: str) -> list[str]:
    """dropin.c ``unit_file_expand_dropin_names`` for a unit that is not a template
    instance: "k3s-agent.service" also takes drop-ins from "k3s-.service.d"."""
    names = [name]
    prefix, dot, kind = name.rpartition(".")
    if not dot or "@" in prefix:
        return names  # template instances ("foo@bar.service") are not looked up here
    while True:
        chopped = False
        while True:  # cut after the last dash; a trailing dash is chopped off once first
            dash = prefix.rfind("-")
            if dash <= 0:
                return names
            if dash + 1 < len(prefix) or chopped:
                prefix = prefix[: dash + 1]
                break
            prefix = prefix[:dash]
            chopped = True
        names.append(f"{prefix}.{kind}")


def _dropins(name: str, root: str) -> list[tuple[str, _Read]]:
    """The drop-ins of ``name`` in the order systemd applies them (conf-files.c): the first
    file of each name wins, in search-directory order; then sorted by file name."""
    kind = name.rpartition(".")[2]
    dirs = [f"{d}/{n}.d" for d in UNIT_DIRS for n in _dropin_names(name)]
    dirs += [f"{d}/{kind}.d" for d in UNIT_DIRS]  # top-level drop-ins come last
    chosen: dict[str, str] = {}
    for directory in dirs:
        resolved = _chase(directory, root)
        if resolved is None:
            continue
        try:
            entries = os.listdir(_host(resolved, root))
        except OSError:
            continue
        for entry in entries:
            if entry.endswith(".conf") and entry not in chosen:
                chosen[entry] = f"{directory}/{entry}"
    return [(chosen[entry], _read(chosen[entry], root)) for entry in sorted(chosen)]


def _glob(pattern: str, root: str) -> list[str]:
    """EnvironmentFile= paths are globbed (execute.c); the matches, sorted, as node paths."""
    if not _GLOB_MAGIC.intersection(pattern):
        return [pattern]
    import glob  # noqa: PLC0415 - only a unit with a wildcard EnvironmentFile= needs it

    base = os.path.normpath(root)
    matches = glob.glob(_host(pattern, root))
    return sorted(m[len(base) :] if base != "/" else m for m in matches) or [pattern]


def _read(path: str, root: str) -> _Read:
    """The bytes of node path ``path`` under ``root``, following symlinks inside ``root``."""
    resolved = _chase(path, root)
    if resolved is None:
        return _Read(None, "unreadable")  # a symlink loop
    if resolved == "/dev/null":
        return _Read(None, "masked")
    try:
        fd = os.open(_host(resolved, root), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        missing = exc.errno in (errno.ENOENT, errno.ENOTDIR)
        return _Read(None, "missing" if missing else "unreadable")
    try:
        with os.fdopen(fd, "rb", closefd=False) as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError:
        return _Read(None, "unreadable")
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        return _Read(None, "unreadable")
    return _Read(data, "ok") if data else _Read(None, "masked")


def _host(path: str, root: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _chase(path: str, root: str) -> str | None:
    """Node path ``path`` with its symlinks resolved inside ``root`` (as systemd's chase()
    with a root does), so an absolute link target stays under ``root``; None for a loop."""
    todo = [part for part in path.split("/") if part]
    done = "/"
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            done = os.path.dirname(done)
            continue
        candidate = os.path.join(done, part)
        try:
            target = os.readlink(_host(candidate, root))
        except OSError:  # not a symlink, or not there: open() will tell
            done = candidate
            continue
        hops += 1
        if hops > _MAX_SYMLINKS:
            return None
        if target.startswith("/"):
            done = "/"
        todo[:0] = [part for part in target.split("/") if part]
    return done
