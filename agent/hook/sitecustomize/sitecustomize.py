"""Started by Python in every process of a `dynamiccl launch` job (the folder is on PYTHONPATH).

Turns the collective-timing hook on when DYNAMICCL_HOOK=1, then runs the
sitecustomize this one shadows (a virtualenv's or the distribution's), so
launching through DynamICCL changes nothing else. Never raises.
"""


def _run() -> None:
    import importlib.machinery
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    if os.environ.get("DYNAMICCL_HOOK") == "1":
        try:
            from dynamiccl.agent.hook.bootstrap import activate

            activate()
        except BaseException as error:  # noqa: BLE001
            print(f"dynamiccl hook: not active in this process: {error.__class__.__name__}: {error}",
                  file=sys.stderr)
    # Chain to the next sitecustomize on the path, which this module hides.
    try:
        others = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
    except BaseException as error:  # noqa: BLE001
        print(f"dynamiccl: the shadowed sitecustomize failed: {error.__class__.__name__}: {error}",
              file=sys.stderr)


_run()
del _run
