"""Progress bars on a terminal only. In a log (CI, `kubectl logs`, a redirected `make run`)
every redraw of a bar is a line of its own, hundreds before "ready"; there the work reports
one line per step instead (the family build per model, the evaluation per row)."""

import os
import sys

from tqdm.auto import tqdm


def bar(iterable=None, **options) -> tqdm:
    """A tqdm bar that is off where stderr is not a terminal (tqdm's ``disable=None``)."""
    return tqdm(iterable, disable=None, **options)


def quiet_library_bars() -> None:
    """Hugging Face's own bars (loading weights, writing shards) off where stderr is not a
    terminal; before transformers is imported, which reads the switch once."""
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
