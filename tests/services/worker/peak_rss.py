"""Peak RSS of this process, for the memory tests' fresh processes."""


def peak_rss_mib() -> float:
    """The high-water mark of this process's resident memory (VmHWM). Not getrusage's
    ru_maxrss: Linux keeps that across execve, so a process started by a large one (pytest
    with its models loaded) would report its parent's peak."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # kB
