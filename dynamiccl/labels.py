"""Bounded Prometheus label values shared by the agent's and the server's metrics, so that
dashboards can set the two side by side."""

_SIZE_CLASSES = ((64 << 10, "<=64KiB"), (1 << 20, "<=1MiB"), (16 << 20, "<=16MiB"), (256 << 20, "<=256MiB"))


def size_class(nbytes: int) -> str:
    """A bounded label for message sizes (exact sizes would explode the label cardinality)."""
    for limit, label in _SIZE_CLASSES:
        if nbytes <= limit:
            return label
    return ">256MiB"
