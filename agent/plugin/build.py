"""Compile DynamICCL's tuner plugin with the system C compiler, once per source version.

The library lands in `$XDG_CACHE_HOME/dynamiccl/plugin` (default
`~/.cache/dynamiccl/plugin`) as `libnccl-tuner-dynamiccl-<hash>.so`, the hash
covering the source, the compiler and its flags: a changed source builds a
new file, an unchanged one is reused. Builds go to a temporary name and are
renamed into place, so ranks or launches building at once never load a
half-written library.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "dynamiccl_tuner.c"
FLAGS = ("-O2", "-fPIC", "-shared", "-fvisibility=hidden", "-std=c11", "-Wall", "-Wextra")
LIBS = ("-lpthread",)
COMPILERS = ("cc", "gcc", "clang")
BUILD_TIMEOUT_S = 120.0


class PluginBuildError(RuntimeError):
    """The plugin could not be built; the message says why (compiler output included)."""


class NoCompiler(PluginBuildError):
    """No C compiler on this machine."""


@dataclass(frozen=True)
class Built:
    path: Path
    compiled: bool  # False: an up-to-date build was reused
    compiler: str


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".cache")
    return Path(base) / "dynamiccl" / "plugin"


def find_compiler(environ: Mapping[str, str] | None = None) -> list[str]:
    """The compiler command: $CC when set (and only then), else cc, gcc or clang on PATH."""
    environ = os.environ if environ is None else environ
    path = environ.get("PATH")
    if environ.get("CC"):
        command = shlex.split(environ["CC"])
        if command and shutil.which(command[0], path=path):
            return command
        raise NoCompiler(f"$CC={environ['CC']!r} is not an executable on PATH")
    for name in COMPILERS:
        found = shutil.which(name, path=path)
        if found:
            return [found]
    raise NoCompiler(f"no C compiler found ({', '.join(COMPILERS)} on PATH, or set $CC)")


def library_name(compiler: list[str], source: bytes) -> str:
    digest = hashlib.sha256()
    for part in (source, "\0".join(compiler).encode(), "\0".join(FLAGS + LIBS).encode()):
        digest.update(part)
        digest.update(b"\0")
    return f"libnccl-tuner-dynamiccl-{digest.hexdigest()[:16]}.so"


def build(force: bool = False, environ: Mapping[str, str] | None = None,
          out_dir: Path | None = None, extra_flags: tuple[str, ...] = ()) -> Built:
    """The plugin's path, compiling it only if this source has no build yet (or `force`)."""
    compiler = find_compiler(environ)
    source = SOURCE.read_bytes()
    target_dir = out_dir or cache_dir(environ)
    target = target_dir / library_name(compiler + list(extra_flags), source)
    if target.is_file() and not force:
        return Built(target, compiled=False, compiler=compiler[0])
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PluginBuildError(f"cannot create {target_dir}: {error}") from None
    fd, tmp_name = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    command = [*compiler, *FLAGS, *extra_flags, "-o", str(tmp), str(SOURCE), *LIBS]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
        if result.returncode != 0:
            raise PluginBuildError(f"{shlex.join(command)} failed ({result.returncode}):\n"
                                   f"{(result.stderr or result.stdout).strip()}")
        tmp.chmod(0o755)
        os.replace(tmp, target)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PluginBuildError(f"{shlex.join(command)} failed: {error}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return Built(target, compiled=True, compiler=compiler[0])
