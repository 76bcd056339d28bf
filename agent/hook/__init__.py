"""What runs inside training: times every collective a process issues (`profiler`), with the
calls it knows (`ops`), NCCL's own timing (`nccl`), an in-process table (`table`) and a sender
to the node agent (`poster`); `bootstrap` turns it on in an unmodified script.

    from dynamiccl.agent import hook
    hook.install(job_id="llama8b-0412")
"""

from dynamiccl.agent.hook.profiler import Profiler, current, install, uninstall

__all__ = ["Profiler", "current", "install", "uninstall"]
