"""Zero-code activation of the hook, run by `agent/hook/sitecustomize/sitecustomize.py`.

`dynamiccl launch` prepends that folder to PYTHONPATH, so every Python
process of the job (torchrun, each rank, any helper) runs `activate()` at
start-up. It does nothing unless DYNAMICCL_HOOK=1; then it installs the hook
as soon as the process has imported `torch` (right away if it already has),
so processes that never touch torch pay nothing. It waits for the whole of
`torch`, not `torch.distributed`: torch imports torch.distributed half-way
through its own import, before `torch.library`, which the hook needs. It must never break
the script: any failure is swallowed and reported once on stderr.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

ENABLE_VARIABLE = "DYNAMICCL_HOOK"
TRIGGER = "torch"
_reported = False


def _number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def _install() -> None:
    global _reported
    try:
        from dynamiccl.agent import hook

        hook.install(
            sample_every=int(_number("DYNAMICCL_HOOK_SAMPLE_EVERY", 1)),
            window_s=_number("DYNAMICCL_HOOK_WINDOW_S", 5.0),
        )
    except BaseException as error:  # noqa: BLE001 - a missing torch or a bad env must not stop the job
        if not _reported:
            _reported = True
            print(f"dynamiccl hook: not active in this process: {error.__class__.__name__}: {error}",
                  file=sys.stderr)


class _InstallAfterImport(importlib.abc.MetaPathFinder):
    """Finds `torch` the normal way, then installs the hook once it has executed."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TRIGGER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original_exec(module)
            _install()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def activate() -> None:
    if os.environ.get(ENABLE_VARIABLE) != "1":
        return
    if TRIGGER in sys.modules:
        _install()
    else:
        sys.meta_path.insert(0, _InstallAfterImport())
